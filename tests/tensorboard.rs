//! The TensorBoard event file a training run writes, read back record by record: TFRecord framing with
//! masked CRC-32C checks, then the `Event` protobufs (file version, scalar and image summaries).

mod common;

use common::{make_dataset, tiny_config};
use lora_studio::config::{LogWith, TrainConfig};
use lora_studio::train::tensorboard::masked_crc;
use lora_studio::train::{CancelToken, SilentReporter, train};

/// Splits a TFRecord file into its records, checking both CRCs of each.
fn records(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let length_bytes = &bytes[at..at + 8];
        let length = u64::from_le_bytes(length_bytes.try_into().unwrap()) as usize;
        let length_crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
        assert_eq!(
            length_crc,
            masked_crc(length_bytes),
            "length CRC of the record at byte {at}"
        );
        let data = &bytes[at + 12..at + 12 + length];
        let data_crc = u32::from_le_bytes(
            bytes[at + 12 + length..at + 16 + length]
                .try_into()
                .unwrap(),
        );
        assert_eq!(
            data_crc,
            masked_crc(data),
            "data CRC of the record at byte {at}"
        );
        out.push(data.to_vec());
        at += 16 + length;
    }
    out
}

/// A decoded protobuf field: number and value.
enum Field {
    Varint(u64),
    Fixed64(u64),
    Fixed32(u32),
    Bytes(Vec<u8>),
}

fn fields(mut bytes: &[u8]) -> Vec<(u32, Field)> {
    let varint = |b: &mut &[u8]| {
        let mut value = 0u64;
        for shift in (0..).step_by(7) {
            let byte = b[0];
            *b = &b[1..];
            value |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                break;
            }
        }
        value
    };
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let key = varint(&mut bytes);
        let field = (key >> 3) as u32;
        let value = match key & 7 {
            0 => Field::Varint(varint(&mut bytes)),
            1 => {
                let v = u64::from_le_bytes(bytes[..8].try_into().unwrap());
                bytes = &bytes[8..];
                Field::Fixed64(v)
            }
            2 => {
                let len = varint(&mut bytes) as usize;
                let v = bytes[..len].to_vec();
                bytes = &bytes[len..];
                Field::Bytes(v)
            }
            5 => {
                let v = u32::from_le_bytes(bytes[..4].try_into().unwrap());
                bytes = &bytes[4..];
                Field::Fixed32(v)
            }
            other => panic!("unexpected wire type {other}"),
        };
        out.push((field, value));
    }
    out
}

#[test]
fn event_file_reads_back_with_scalars_and_sample_images() {
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 3);
    let config = TrainConfig {
        max_train_steps: Some(4),
        log_with: LogWith::Tensorboard,
        sample_every_n_steps: 4,
        sample_prompts: vec!["neon city".into()],
        sample_steps: 2,
        sample_strengths: vec![0.0, 1.0],
        ..tiny_config(&data, &dir.path().join("out"))
    };
    train(&config, None, &mut SilentReporter, &CancelToken::default()).unwrap();
    let logs = dir.path().join("out/logs");
    let file = std::fs::read_dir(&logs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert!(
        file.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("events.out.tfevents.")
    );
    let records = records(&std::fs::read(&file).unwrap());

    let first = fields(&records[0]);
    let (1, Field::Fixed64(wall_time)) = first[0] else {
        panic!("the first field is not wall_time")
    };
    assert!(
        f64::from_bits(wall_time) > 1.6e9,
        "wall_time is Unix seconds"
    );
    assert!(matches!(&first[1], (3, Field::Bytes(v)) if v == b"brain.Event:2"));

    let mut losses = Vec::new();
    let mut images = Vec::new();
    for record in &records[1..] {
        let event = fields(record);
        let step = event.iter().find_map(|(n, f)| match (n, f) {
            (2, Field::Varint(s)) => Some(*s),
            _ => None,
        });
        let Some((_, Field::Bytes(summary))) = event.iter().find(|(n, _)| *n == 5) else {
            continue;
        };
        let Some((_, Field::Bytes(value))) = fields(summary).into_iter().next() else {
            panic!("empty summary")
        };
        let value = fields(&value);
        let Some((_, Field::Bytes(tag))) = value.iter().find(|(n, _)| *n == 1) else {
            panic!("no tag")
        };
        let tag = String::from_utf8(tag.clone()).unwrap();
        for (number, field) in &value {
            match (number, field) {
                (2, Field::Fixed32(bits)) if tag == "loss" => {
                    losses.push((step.unwrap(), f32::from_bits(*bits)))
                }
                (4, Field::Bytes(image)) => {
                    let image = fields(image);
                    let png = image.iter().find_map(|(n, f)| match (n, f) {
                        (4, Field::Bytes(b)) => Some(b.clone()),
                        _ => None,
                    });
                    assert!(png.unwrap().starts_with(b"\x89PNG"), "{tag} holds a PNG");
                    images.push(tag.clone());
                }
                _ => {}
            }
        }
    }
    assert_eq!(
        losses.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert!(losses.iter().all(|(_, l)| l.is_finite() && *l > 0.0));
    assert_eq!(
        images,
        vec!["samples/prompt0/strength0", "samples/prompt0/strength1"]
    );
}
