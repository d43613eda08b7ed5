//! Whether a transcript reads as a finished turn: the words half of the end-of-turn decision.
//!
//! The voice detector hears *that* the user fell silent; this says whether what they said so far
//! is complete. Whisper-style recognisers punctuate, so a finished question or sentence ends in
//! `?`, `.`, `!` (or `？`, `。`, `！`). A recogniser also puts a full stop after words that stop
//! mid-sentence, so the last word counts too: a turn that ends in "and", "of", "the", "plus" or
//! "是", "的", "和" is waiting for more, and so is one that trails off ("so...", "um").
//!
//! ```text
//! "What is two plus two?"        complete      the answer starts after a short silence
//! "What is the capital of."      not complete  the full hangover: the user may go on
//! "Tell me about"                not complete  no final punctuation
//! "我想知道的是。"                not complete  ends in 是
//! ```
//!
//! It is a heuristic, measured in `tests/tests/voice.rs` (false cut-offs on a 400 ms pause
//! inside a sentence) and in `bench-asr`. A wrong "complete" cuts the user off after
//! `talk.vad.complete_silence_ms`; a wrong "not complete" only waits the full `min_silence_ms`.

/// Words after which an English sentence is not over.
const CONTINUES: &[&str] = &[
    "a", "an", "the", "and", "or", "but", "nor", "because", "if", "than", "of", "to", "in", "on", "at", "by", "for",
    "with", "from", "into", "about", "like", "as", "my", "your", "his", "her", "its", "our", "their", "plus", "minus",
    "times", "divided", "um", "uh", "er", "erm", "hmm", "mm",
];

/// Characters after which a Chinese sentence is not over.
const CONTINUES_ZH: &[char] = &[
    '的', '和', '跟', '与', '或', '是', '在', '把', '被', '给', '对', '从', '向', '但', '而', '如', '因', '所', '就',
    '还', '也', '都', '很', '最', '个', '这', '那', '嗯', '呃', '啊',
];

/// Whether `text` (a transcript so far) reads as a finished sentence or question.
pub fn looks_complete(text: &str) -> bool {
    let text = text.trim_end_matches(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '”' | '’' | ')' | '」'));
    if text.ends_with("...") || text.ends_with('…') || text.ends_with("。。") {
        return false; // trailing off
    }
    let Some(last) = text.chars().next_back() else {
        return false;
    };
    if !matches!(last, '.' | '?' | '!' | '。' | '？' | '！') {
        return false;
    }
    let body = text.trim_end_matches(['.', '?', '!', '。', '？', '！']);
    let Some(before) = body.chars().next_back() else {
        return false;
    };
    if is_cjk(before) {
        return !CONTINUES_ZH.contains(&before);
    }
    let word: String = body
        .rsplit(|c: char| !(c.is_alphanumeric() || c == '\''))
        .next()
        .unwrap_or_default()
        .to_lowercase();
    !word.is_empty() && !CONTINUES.contains(&word.as_str())
}

fn is_cjk(c: char) -> bool {
    matches!(c, '\u{3400}'..='\u{9fff}' | '\u{f900}'..='\u{faff}' | '\u{20000}'..='\u{2ffff}')
}

#[cfg(test)]
mod tests {
    use super::looks_complete;

    #[test]
    fn finished_questions_and_sentences_are_complete() {
        for text in [
            "What is two plus two?",
            "Why is the sky blue?",
            "Explain fractions to me.",
            "Thanks!",
            " How many legs does a spider have? ",
            "法国的首都是哪里？",
            "请给我讲讲分数。",
            "He said \"yes.\"",
            "What is it?",
            "Why?",
            "Can you tell me what that is?",
        ] {
            assert!(looks_complete(text), "{text:?}");
        }
    }

    #[test]
    fn words_that_stop_mid_sentence_are_not() {
        for text in [
            "",
            "What is the capital of",
            "What is the capital of.",
            "What is two plus?",
            "Tell me about the",
            "I want to know, um.",
            "So...",
            "Well…",
            "我想知道的是。",
            "法国的首都",
            "And.",
            "?",
        ] {
            assert!(!looks_complete(text), "{text:?}");
        }
    }
}
