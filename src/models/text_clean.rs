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
    let text = if text.contains('<') && text.contains('>') { text.to_string() } else { unescape_html(text) };
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
    matches!(c, '\u{0}'..='\u{8}' | '\u{B}' | '\u{E}'..='\u{1F}' | '\u{7F}' | '\u{200B}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFC}')
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
