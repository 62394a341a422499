//! Caption files are the user's data: an edit saved into a `metadata.csv` changes only the row it is about,
//! whatever the header looks like (file-name column first or last, extra columns), and keeps every other byte
//! (quoting, byte-order mark, line endings); and two threads saving captions into the same file at once
//! lose nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Barrier, Mutex};

use lora_studio::data::caption_store::{CaptionTarget, IfCaptioned, save_caption};
use lora_studio::data::captions::read_metadata_csv;

/// Saves `caption` for `relative` into the CSV `path`, as an edit in the app does.
fn edit(path: &Path, relative: &str, caption: &str) {
    save_caption(
        &CaptionTarget::Csv(path.to_path_buf()),
        Path::new(relative),
        caption,
        IfCaptioned::Replace,
    )
    .unwrap();
}

/// A dataset folder holding `metadata.csv` with `text` and the images it names.
fn dataset_with_csv(dir: &Path, text: &str, images: &[&str]) -> PathBuf {
    for name in images {
        std::fs::write(dir.join(name), b"never read").unwrap();
    }
    let csv = dir.join("metadata.csv");
    std::fs::write(&csv, text).unwrap();
    csv
}

/// The captions the dataset loader reads from `csv`, by file name.
fn read_back(csv: &Path) -> HashMap<String, String> {
    read_metadata_csv(csv, csv.parent().unwrap())
        .unwrap()
        .into_iter()
        .map(|(path, caption)| (path.display().to_string(), caption))
        .collect()
}

/// `lines` joined with `ending`, each line terminated.
fn lines(ending: &str, lines: &[&str]) -> String {
    lines.iter().map(|line| format!("{line}{ending}")).collect()
}

#[test]
fn an_edit_changes_only_its_row_whichever_column_holds_the_file_name() {
    // (header, untouched row, edited row before, edited row after, added row), for both column orders,
    // with extra columns before, between and after, quoted and unquoted.
    let layouts = [
        (
            "text,file_name",
            "\"neon, rain\",\"a.png\"",
            "old words,b.png",
            "\"new, words\",b.png",
            "added,c.png",
        ),
        (
            "file_name,text",
            "\"a.png\",\"neon, rain\"",
            "b.png,old words",
            "b.png,\"new, words\"",
            "c.png,added",
        ),
        (
            "file_name,text,score,notes",
            "a.png,\"neon, rain\",0.50,\"kept \"\"as is\"\"\"",
            "b.png,old words,0.25,second pass",
            "b.png,\"new, words\",0.25,second pass",
            "c.png,added,,",
        ),
        (
            "notes,Caption,File_Name,score",
            "\"kept, as is\",\"neon, rain\",a.png,1",
            "x,old words,b.png,2",
            "x,\"new, words\",b.png,2",
            ",added,c.png,",
        ),
    ];
    for (header, untouched, before, after, added) in layouts {
        for (bom, ending) in [("", "\n"), ("\u{feff}", "\r\n")] {
            let what = format!(
                "header {header:?}, BOM {:?}, ending {ending:?}",
                !bom.is_empty()
            );
            let dir = tempfile::tempdir().unwrap();
            let original = format!("{bom}{}", lines(ending, &[header, untouched, before]));
            let csv = dataset_with_csv(dir.path(), &original, &["a.png", "b.png", "c.png"]);

            edit(&csv, "b.png", "new, words");
            let edited = std::fs::read_to_string(&csv).unwrap();
            assert_eq!(
                edited,
                format!("{bom}{}", lines(ending, &[header, untouched, after])),
                "{what}"
            );

            edit(&csv, "c.png", "added");
            let grown = std::fs::read_to_string(&csv).unwrap();
            assert_eq!(
                grown,
                format!("{bom}{}", lines(ending, &[header, untouched, after, added])),
                "{what}"
            );
            let captions = read_back(&csv);
            assert_eq!(captions.len(), 3, "{what}: {captions:?}");
            assert_eq!(captions["a.png"], "neon, rain", "{what}");
            assert_eq!(captions["b.png"], "new, words", "{what}");
            assert_eq!(captions["c.png"], "added", "{what}");
        }
    }
}

#[test]
fn a_csv_without_a_header_or_a_final_line_break_keeps_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    let original = "a.png,\"neon, rain\"\n\n./b.png,old words";
    let csv = dataset_with_csv(dir.path(), original, &["a.png", "b.png", "c.png"]);
    edit(&csv, "b.png", "new words");
    assert_eq!(
        std::fs::read_to_string(&csv).unwrap(),
        "a.png,\"neon, rain\"\n\n./b.png,new words"
    );
    edit(&csv, "c.png", "added");
    assert_eq!(
        std::fs::read_to_string(&csv).unwrap(),
        "a.png,\"neon, rain\"\n\n./b.png,new words\nc.png,added\n"
    );
    let captions = read_back(&csv);
    assert_eq!(
        (
            captions["a.png"].as_str(),
            captions["b.png"].as_str(),
            captions["c.png"].as_str()
        ),
        ("neon, rain", "new words", "added")
    );
}

#[test]
fn a_caption_with_a_line_break_is_refused_and_the_csv_stays_readable() {
    let dir = tempfile::tempdir().unwrap();
    let original = "file_name,text\na.png,neon\n";
    let csv = dataset_with_csv(dir.path(), original, &["a.png"]);
    let message = save_caption(
        &CaptionTarget::Csv(csv.clone()),
        Path::new("a.png"),
        "neon\nrain",
        IfCaptioned::Replace,
    )
    .map_or_else(|e| e.to_string(), |_| "saved".to_string());
    assert!(
        message.contains("metadata.csv: the caption of `a.png` has a line break"),
        "{message}"
    );
    assert_eq!(std::fs::read_to_string(&csv).unwrap(), original);
    assert_eq!(read_back(&csv)["a.png"], "neon");
}

#[test]
fn a_new_csv_gets_a_header() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("metadata.csv");
    std::fs::write(dir.path().join("a.png"), b"never read").unwrap();
    edit(&csv, "a.png", "first words");
    assert_eq!(
        std::fs::read_to_string(&csv).unwrap(),
        "file_name,text\na.png,first words\n"
    );
}

#[test]
fn two_threads_saving_into_the_same_csv_lose_no_row() {
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..400).map(|i| format!("img{i:03}.png")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let csv = dataset_with_csv(dir.path(), "file_name,text,notes\n", &refs);
    let start = Barrier::new(2);
    let errors = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for half in names.chunks(names.len() / 2) {
            let (csv, start, errors) = (&csv, &start, &errors);
            scope.spawn(move || {
                start.wait();
                for name in half {
                    let target = CaptionTarget::Csv(csv.clone());
                    let caption = format!("caption of {name}");
                    if let Err(e) =
                        save_caption(&target, Path::new(name), &caption, IfCaptioned::Replace)
                    {
                        errors.lock().unwrap().push(e.to_string());
                    }
                }
            });
        }
    });
    let errors = errors.into_inner().unwrap();
    let captions = read_back(&csv);
    let lost: Vec<&String> = names
        .iter()
        .filter(|n| !captions.contains_key(*n))
        .collect();
    assert!(
        lost.is_empty() && errors.is_empty(),
        "{} rows lost, first {:?}; {} saves failed, first {:?}",
        lost.len(),
        lost.first(),
        errors.len(),
        errors.first()
    );
    for name in &names {
        assert_eq!(captions[name], format!("caption of {name}"));
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
