//! TensorBoard event files (`events.out.tfevents.*`), written directly: TFRecord framing with masked
//! CRC-32C checksums around hand-encoded `Event` protobufs carrying scalar and image summaries.
//! `tensorboard --logdir OUTPUT/logs` reads them.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Appends events to one event file.
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

impl EventWriter {
    /// Creates a new event file in `dir` and writes the file-version record.
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let seconds = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let path = dir.join(format!(
            "events.out.tfevents.{seconds}.lora-studio.{}",
            std::process::id()
        ));
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let mut writer = Self { file, path };
        let mut event = Vec::new();
        put_double(&mut event, 1, wall_time());
        put_bytes(&mut event, 3, b"brain.Event:2");
        writer.write_record(&event)?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Logs a scalar at a step.
    pub fn scalar(&mut self, tag: &str, value: f32, step: u64) -> std::io::Result<()> {
        let mut summary_value = Vec::new();
        put_bytes(&mut summary_value, 1, tag.as_bytes());
        put_float(&mut summary_value, 2, value);
        self.summary(&summary_value, step)
    }

    /// Logs a PNG image at a step.
    pub fn image(
        &mut self,
        tag: &str,
        png: &[u8],
        width: u32,
        height: u32,
        step: u64,
    ) -> std::io::Result<()> {
        let mut image = Vec::new();
        put_varint_field(&mut image, 1, height as u64);
        put_varint_field(&mut image, 2, width as u64);
        put_varint_field(&mut image, 3, 3);
        put_bytes(&mut image, 4, png);
        let mut summary_value = Vec::new();
        put_bytes(&mut summary_value, 1, tag.as_bytes());
        put_bytes(&mut summary_value, 4, &image);
        self.summary(&summary_value, step)
    }

    fn summary(&mut self, summary_value: &[u8], step: u64) -> std::io::Result<()> {
        let mut summary = Vec::new();
        put_bytes(&mut summary, 1, summary_value);
        let mut event = Vec::new();
        put_double(&mut event, 1, wall_time());
        put_varint_field(&mut event, 2, step);
        put_bytes(&mut event, 5, &summary);
        self.write_record(&event)
    }

    fn write_record(&mut self, data: &[u8]) -> std::io::Result<()> {
        let length = (data.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(data.len() + 16);
        record.extend_from_slice(&length);
        record.extend_from_slice(&masked_crc(&length).to_le_bytes());
        record.extend_from_slice(data);
        record.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file.write_all(&record)?;
        self.file.flush()
    }
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_varint_field(out: &mut Vec<u8>, field: u32, value: u64) {
    put_varint(out, (field as u64) << 3);
    put_varint(out, value);
}

fn put_double(out: &mut Vec<u8>, field: u32, value: f64) {
    put_varint(out, ((field as u64) << 3) | 1);
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_float(out: &mut Vec<u8>, field: u32, value: f32) {
    put_varint(out, ((field as u64) << 3) | 5);
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_varint(out, ((field as u64) << 3) | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// TFRecord's masked CRC-32C.
pub fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// CRC-32C (Castagnoli), bitwise with a small table.
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut table = [0u32; 256];
        for (i, entry) in table.iter_mut().enumerate() {
            let mut crc = i as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0x82F6_3B78
                } else {
                    crc >> 1
                };
            }
            *entry = crc;
        }
        table
    });
    !data.iter().fold(!0u32, |crc, &b| {
        table[((crc ^ b as u32) & 0xFF) as usize] ^ (crc >> 8)
    })
}

#[cfg(test)]
mod tests {
    use super::crc32c;

    #[test]
    fn crc32c_known_value() {
        // The CRC-32C check value.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }
}
