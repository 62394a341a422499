//! A stand-in for the Hugging Face Hub's file endpoint on a local port, for download tests: byte ranges,
//! the headers hf-hub reads, transfers cut half way, and a corrupted byte.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// A stand-in for the Hub's file endpoint: `GET /{repo}/resolve/main/{file}` with byte ranges, the
/// `ETag`/`X-Repo-Commit` headers hf-hub reads, 404 for unknown files. The first `cut_transfers` downloads
/// of `cut_file` stop half way.
pub struct FakeHub {
    pub address: String,
    requests: Arc<Mutex<Vec<String>>>,
}

pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

impl FakeHub {
    pub fn start(repo: &str, folder: &Path, cut_file: &str, cut_transfers: usize) -> Self {
        Self::serving(repo, folder, cut_file, cut_transfers, None)
    }

    /// [`FakeHub::start`], with byte `corrupt.1` of the file `corrupt.0` flipped in what is sent (the ETag
    /// stays the SHA-256 of the true file).
    pub fn serving(
        repo: &str,
        folder: &Path,
        cut_file: &str,
        cut_transfers: usize,
        corrupt: Option<(&str, usize)>,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        // Each file as served, with the ETag of its true contents.
        let files: HashMap<String, (Vec<u8>, String)> = std::fs::read_dir(folder)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_file())
            .map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let mut bytes = std::fs::read(e.path()).unwrap();
                let etag = lora_studio::hashing::sha256_hex(&bytes);
                if let Some((file, index)) = corrupt
                    && file == name
                {
                    bytes[index] ^= 0x5a;
                }
                (format!("/{repo}/resolve/main/{name}"), (bytes, etag))
            })
            .collect();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        let cut_path = format!("/{repo}/resolve/main/{cut_file}");
        std::thread::spawn(move || {
            let mut cuts_left = cut_transfers;
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (path, range) = read_request(&stream);
                log.lock()
                    .unwrap()
                    .push(format!("{path} {}", range.clone().unwrap_or_default()));
                let cut =
                    path == cut_path && range.as_deref() != Some("bytes=0-0") && cuts_left > 0;
                if cut {
                    cuts_left -= 1;
                }
                respond(stream, files.get(&path), range.as_deref(), cut);
            }
        });
        Self { address, requests }
    }

    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

fn read_request(stream: &TcpStream) -> (String, Option<String>) {
    let mut reader = BufReader::new(stream);
    let mut first = String::new();
    reader.read_line(&mut first).unwrap_or_default();
    let path = first
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("range")
        {
            range = Some(value.trim().to_string());
        }
    }
    (path, range)
}

fn respond(
    mut stream: TcpStream,
    file: Option<&(Vec<u8>, String)>,
    range: Option<&str>,
    cut: bool,
) {
    let Some((body, etag)) = file else {
        let _ = stream
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    };
    let size = body.len();
    let (start, end) = match range.and_then(|r| r.strip_prefix("bytes=")) {
        Some(r) => {
            let (a, b) = r.split_once('-').unwrap();
            let start: usize = a.parse().unwrap();
            let end = if b.is_empty() {
                size - 1
            } else {
                b.parse::<usize>().unwrap().min(size - 1)
            };
            (start, end)
        }
        None => (0, size - 1),
    };
    let status = if range.is_some() {
        "206 Partial Content"
    } else {
        "200 OK"
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{end}/{size}\r\nETag: \"{etag}\"\r\nX-Repo-Commit: {COMMIT}\r\nConnection: close\r\n\r\n",
        end + 1 - start
    );
    let _ = stream.write_all(head.as_bytes());
    let part = &body[start..=end];
    let sent = if cut { &part[..part.len() / 2] } else { part };
    let _ = stream.write_all(sent);
    let _ = stream.flush();
    // Drain what the client still sends so the close is clean, then drop the connection.
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
}

/// The byte offsets of the ranged (resuming) requests for `file`.
pub fn resumed_offsets(requests: &[String], file: &str) -> Vec<u64> {
    requests
        .iter()
        .filter(|r| r.contains(&format!("/{file} ")))
        .filter_map(|r| r.split("bytes=").nth(1)?.strip_suffix('-')?.parse().ok())
        .filter(|&offset| offset > 0)
        .collect()
}
