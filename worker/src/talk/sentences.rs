//! Cut the LLM's token stream into sentences for TTS, as early as is safe.
//!
//! A sentence ends at `。！？；` (and their full-width friends) at once, and at `. ! ? ;` when
//! whitespace follows (so `3.14` and `U.S.` mid-word do not cut) or the stream ends. A newline
//! always ends one. A run-on sentence is cut at a comma once it passes [`SOFT_LIMIT`] characters,
//! and anywhere at [`HARD_LIMIT`], so the first audio never waits for a long paragraph.

/// Past this many characters, a comma ends the sentence.
pub const SOFT_LIMIT: usize = 120;
/// Past this many characters, the sentence is cut wherever it is.
pub const HARD_LIMIT: usize = 300;

#[derive(Debug, Default)]
pub struct SentenceChunker {
    buf: String,
}

fn is_cjk_end(c: char) -> bool {
    matches!(c, '。' | '！' | '？' | '；' | '…' | '｡')
}

fn is_ascii_end(c: char) -> bool {
    matches!(c, '.' | '!' | '?' | ';')
}

fn is_comma(c: char) -> bool {
    matches!(c, ',' | '，' | '、' | ':' | '：')
}

impl SentenceChunker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a text delta; returns the sentences it completed.
    pub fn push(&mut self, delta: &str) -> Vec<String> {
        self.buf.push_str(delta);
        let mut out = Vec::new();
        while let Some(end) = self.cut() {
            let rest = self.buf.split_off(end);
            let sentence = std::mem::replace(&mut self.buf, rest);
            let sentence = sentence.trim();
            if sentence.chars().any(char::is_alphanumeric) {
                out.push(sentence.to_owned());
            }
        }
        out
    }

    /// The stream ended: whatever is left is the last sentence.
    pub fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.buf);
        let rest = rest.trim();
        rest.chars().any(char::is_alphanumeric).then(|| rest.to_owned())
    }

    /// Byte offset just after the first complete sentence in `buf`, if any.
    fn cut(&self) -> Option<usize> {
        let mut chars = self.buf.char_indices().peekable();
        let mut count = 0;
        let mut last_comma = None;
        while let Some((i, c)) = chars.next() {
            count += 1;
            let after = i + c.len_utf8();
            if c == '\n' || is_cjk_end(c) {
                return Some(after);
            }
            if is_ascii_end(c) {
                match chars.peek() {
                    Some((_, n)) if n.is_whitespace() => return Some(after),
                    _ => {}
                }
            }
            if is_comma(c) {
                last_comma = Some(after);
                if count >= SOFT_LIMIT {
                    return Some(after);
                }
            }
            if count >= HARD_LIMIT {
                return Some(last_comma.unwrap_or(after));
            }
        }
        None
    }
}

/// Does `text` look Chinese (any CJK ideograph)? Picks the scripted reply's language and the
/// default voice.
pub fn is_chinese(text: &str) -> bool {
    text.chars()
        .any(|c| matches!(c as u32, 0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0xF900..=0xFAFF))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(deltas: &[&str]) -> Vec<String> {
        let mut c = SentenceChunker::new();
        let mut out: Vec<String> = deltas.iter().flat_map(|d| c.push(d)).collect();
        out.extend(c.finish());
        out
    }

    #[test]
    fn english_sentences_end_at_punctuation_followed_by_space() {
        assert_eq!(
            chunk(&["Hello th", "ere. Pi is 3.", "14! Is it", "? Yes"]),
            ["Hello there.", "Pi is 3.14!", "Is it?", "Yes"]
        );
    }

    #[test]
    fn chinese_sentences_end_at_once() {
        assert_eq!(
            chunk(&["你好", "！今天我们", "学习数学。", "好吗？"]),
            ["你好！", "今天我们学习数学。", "好吗？"]
        );
    }

    #[test]
    fn a_sentence_is_emitted_as_soon_as_it_is_complete() {
        let mut c = SentenceChunker::new();
        assert!(c.push("First one").is_empty());
        assert!(c.push(".").is_empty(), "could be 3.14: wait for the next character");
        assert_eq!(c.push(" Sec"), ["First one."]);
        assert_eq!(c.push("ond\nthird"), ["Second"]);
        assert_eq!(c.finish().as_deref(), Some("third"));
    }

    #[test]
    fn long_runs_are_cut_at_a_comma_then_anywhere() {
        let long = format!("{}, and more words", "word ".repeat(30));
        let out = chunk(&[&long]);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(out[0].ends_with(','));
        let no_break = "x".repeat(HARD_LIMIT * 2 + 10);
        let out = chunk(&[&no_break]);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].chars().count(), HARD_LIMIT);
    }

    #[test]
    fn punctuation_only_pieces_are_dropped() {
        assert_eq!(chunk(&["... ", "!!\n", "ok"]), ["ok"]);
    }

    #[test]
    fn language_detection() {
        assert!(is_chinese("请解释一下"));
        assert!(!is_chinese("explain this, please"));
    }
}
