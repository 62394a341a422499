//! Prompt clean-up before CLIP tokenization, as the reference does it: ftfy's `fix_text` (HTML entities,
//! curly quotes, ligatures, full-width characters, control characters, NFC), whitespace collapsed to
//! single spaces, then lower case.

use unicode_normalization::UnicodeNormalization;

/// Cleans a prompt the way CLIP's tokenizer expects.
pub fn clean_text(text: &str) -> String {
    let fixed = fix_text(text);
    let collapsed = fixed.split_whitespace().collect::<Vec<_>>().join(" ");
    collapsed.to_lowercase()
}

/// The parts of ftfy's default `fix_text` that change real prompts.
fn fix_text(text: &str) -> String {
    // ftfy leaves entities alone in text that looks like HTML, and otherwise decodes them to a fixed point.
    let mut text = text.to_string();
    if !text.contains('<') {
        loop {
            let decoded = unescape_html(&text);
            if decoded == text {
                break;
            }
            text = decoded;
        }
    }
    let text = fix_mojibake(&text);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\u{2018}' | '\u{2019}' | '\u{201A}' | '\u{201B}' => out.push('\''),
            '\u{201C}' | '\u{201D}' | '\u{201E}' | '\u{201F}' => out.push('"'),
            '\u{FB00}' => out.push_str("ff"),
            '\u{FB01}' => out.push_str("fi"),
            '\u{FB02}' => out.push_str("fl"),
            '\u{FB03}' => out.push_str("ffi"),
            '\u{FB04}' => out.push_str("ffl"),
            '\u{FB05}' | '\u{FB06}' => out.push_str("st"),
            // Full-width ASCII and the ideographic space become their plain forms.
            '\u{FF01}'..='\u{FF5E}' => out.push(char::from_u32(c as u32 - 0xFEE0).unwrap_or(c)),
            '\u{3000}' => out.push(' '),
            '\r' | '\u{2028}' | '\u{2029}' | '\u{0085}' => out.push('\n'),
            c if is_removable_control(c) => {}
            c => out.push(c),
        }
    }
    out.nfc().collect()
}

/// Control characters ftfy removes (it keeps tab, newline, form feed and carriage return).
fn is_removable_control(c: char) -> bool {
    matches!(c, '\u{0}'..='\u{8}' | '\u{B}' | '\u{E}'..='\u{1F}' | '\u{7F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFC}')
}

/// Decodes `&amp;`, `&lt;`, `&gt;`, `&quot;`, `&apos;`, `&nbsp;` and numeric entities; others stay as written.
fn unescape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let tail = &rest[amp..];
        let decoded = tail.find(';').filter(|&end| end <= 10).and_then(|end| {
            let entity = &tail[1..end];
            let c = match entity {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                "nbsp" => Some('\u{A0}'),
                _ => {
                    let number = entity.strip_prefix('#')?;
                    let value = match number.strip_prefix(['x', 'X']) {
                        Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                        None => number.parse().ok()?,
                    };
                    char::from_u32(value)
                }
            }?;
            Some((c, end + 1))
        });
        match decoded {
            Some((c, consumed)) => {
                out.push(c);
                rest = &tail[consumed..];
            }
            None => {
                out.push('&');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Windows-1252's characters for bytes 0x80..0x9F (ftfy's "sloppy" variant keeps the five undefined bytes as
/// the same-numbered control characters).
const CP1252_HIGH: [char; 32] = [
    '\u{20AC}', '\u{81}', '\u{201A}', '\u{192}', '\u{201E}', '\u{2026}', '\u{2020}', '\u{2021}',
    '\u{2C6}', '\u{2030}', '\u{160}', '\u{2039}', '\u{152}', '\u{8D}', '\u{17D}', '\u{8F}',
    '\u{90}', '\u{2018}', '\u{2019}', '\u{201C}', '\u{201D}', '\u{2022}', '\u{2013}', '\u{2014}',
    '\u{2DC}', '\u{2122}', '\u{161}', '\u{203A}', '\u{153}', '\u{9D}', '\u{17E}', '\u{178}',
];

/// The Windows-1252 byte of a character, if it has one.
fn cp1252_byte(c: char) -> Option<u8> {
    match c as u32 {
        0..=0x7F | 0xA0..=0xFF => Some(c as u32 as u8),
        _ => CP1252_HIGH
            .iter()
            .position(|&h| h == c)
            .map(|i| 0x80 + i as u8),
    }
}

/// Repairs UTF-8 text that was decoded as Windows-1252 ("cafÃ©" -> "café"): each run of characters that
/// Windows-1252 can encode is re-encoded, and kept decoded as UTF-8 when that is valid and differs.
fn fix_mojibake(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut run = Vec::new();
    let mut run_text = String::new();
    let flush = |run: &mut Vec<u8>, run_text: &mut String, out: &mut String| {
        match std::str::from_utf8(run) {
            Ok(decoded) if run.iter().any(|b| *b >= 0x80) => out.push_str(decoded),
            _ => out.push_str(run_text),
        }
        run.clear();
        run_text.clear();
    };
    for c in text.chars() {
        match cp1252_byte(c) {
            Some(b) => {
                run.push(b);
                run_text.push(c);
            }
            None => {
                flush(&mut run, &mut run_text, &mut out);
                out.push(c);
            }
        }
    }
    flush(&mut run, &mut run_text, &mut out);
    out
}
