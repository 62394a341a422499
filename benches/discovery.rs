//! How long finding the models takes on a fake computer (AUTOMATIC1111, Forge, ComfyUI, a Hugging Face
//! cache, a symlink loop and 10,000 unrelated files in the home folder): the first scan, which reads every
//! model's header, and the next ones, served from the description cache.
//!
//! `cargo bench --bench discovery`

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::fake_installs::fake_computer;
use lora_studio::discovery::{DiscoveryOptions, discover};

fn main() {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let (home, hub) = fake_computer(dir.path());
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    let mut models = 0;
    for round in 0..5 {
        let data = dir.path().join(format!("data{round}"));
        let options = DiscoveryOptions {
            home: Some(home.clone()),
            hub_cache: Some(hub.clone()),
            extra_roots: Vec::new(),
            cache_file: Some(data.join("models-cache.json")),
            time_limit: Duration::from_secs(60),
        };
        let started = Instant::now();
        models = discover(&options).models.len();
        cold.push(started.elapsed());
        for _ in 0..4 {
            let started = Instant::now();
            let found = discover(&options);
            warm.push(started.elapsed());
            assert_eq!(found.cached, models + 1);
        }
    }
    let median = |times: &mut Vec<Duration>| {
        times.sort();
        times[times.len() / 2].as_secs_f64() * 1000.0
    };
    println!(
        "{models} models among 10,000 unrelated files: first scan {:.1} ms, from the cache {:.1} ms (medians of {} and {})",
        median(&mut cold),
        median(&mut warm),
        cold.len(),
        warm.len()
    );
}
