//! The WordPiece tokenizer against the `tokenizers` crate on the same `tokenizer.json`: every
//! document and query of the two test collections, the MiniLM fixture sentences, hand-picked
//! edge cases and seeded random strings must give identical ids, at several truncation lengths
//! and with each normaliser switch flipped.

mod common;

use rrra::data::beir::{read_corpus, read_queries};
use rrra::model::tokenizer::TextTokenizer;
use rrra::model::wordpiece::Scratch;
use std::path::Path;

fn edge_cases() -> Vec<String> {
    let mut v: Vec<String> = [
        "",
        " ",
        "\t\n\r",
        "Hey friend!     How are you?!?",
        "Café naïve résumé coöperate",
        "İstanbul ǅemal straße ΟΔΟΣ Σίσυφος",
        "e\u{301}\u{302}x a\u{0323}\u{0302} \u{1e69}",
        "野口里佳 Noguchi Rika 東京タワー 한국어 텍스트",
        "\u{f900}\u{2f800}\u{20000}x\u{3400}",
        "a\u{4e00}b\u{9fff}c\u{4dbf}d\u{faff}e\u{2a6df}f\u{2fa1f}g\u{2b81f}h\u{2ceaf}i\u{2b920}j\u{2a700}k\u{2b740}l",
        "\u{0}a\u{fffd}b\u{7}c\u{200f}d\u{200b}e\u{feff}f",
        "nbsp\u{a0}ideographic\u{3000}line\u{2028}para\u{2029}end",
        "[CLS] hello [MASK]world[SEP] [[MASK]] [mask] [UNK][PAD]",
        "[MASK",
        "$%&*+<=>^`|~ ∑∫≤ «quotes» „low” ‘single’ — – … · • ¿¡ 《》",
        "😀👍🏽 👨‍👩‍👧 ✈️ ©®™",
        "हिन्दी में पाठ العَرَبِيَّة ไทย ภาษา",
        "ﬁ ﬂ ﬀ Ⅳ ① ｆｕｌｌｗｉｄｔｈ",
        "antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
        "x1y2z3 3.14159 1,000,000 e-mail user@example.com http://a.b/c?d=e#f",
        "supercalifragilisticexpialidocious-supercalifragilisticexpialidocious",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push("a".repeat(100));
    v.push("a".repeat(101));
    v.push(format!("{} tail", "é".repeat(101)));
    v.push("word ".repeat(600));
    v
}

/// Seeded strings over a mix of ASCII, Latin with accents, combining marks, CJK, Hangul,
/// punctuation, controls, whitespace of every kind and emoji.
fn random_strings(n: usize, seed: u64) -> Vec<String> {
    const POOL: &[char] = &[
        'a',
        'b',
        'e',
        'k',
        'z',
        'A',
        'Q',
        'Z',
        '0',
        '7',
        ' ',
        ' ',
        ' ',
        '\t',
        '\n',
        '.',
        ',',
        '!',
        '-',
        '(',
        ')',
        '[',
        ']',
        '#',
        'é',
        'Ö',
        'ñ',
        'ß',
        'İ',
        'Σ',
        'ς',
        '\u{301}',
        '\u{308}',
        '\u{323}',
        '野',
        '里',
        '\u{f900}',
        '한',
        '글',
        'タ',
        '\u{0}',
        '\u{7}',
        '\u{fffd}',
        '\u{200b}',
        '\u{a0}',
        '\u{3000}',
        '😀',
        '\u{1f3fd}',
        '«',
        '—',
        '…',
        '∑',
        '$',
        '^',
        '`',
    ];
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    (0..n)
        .map(|_| {
            let len = (next() % 60) as usize;
            let mut t: String = (0..len)
                .map(|_| POOL[(next() % POOL.len() as u64) as usize])
                .collect();
            match next() % 8 {
                0 => t.push_str("[MASK]"),
                1 => t.insert_str(0, "x[SEP]"),
                _ => {}
            }
            t
        })
        .collect()
}

fn all_texts() -> Vec<String> {
    let mut texts = edge_cases();
    texts.extend(common::minilm_sentences());
    for name in ["scifact", "cranfield"] {
        let dir = common::shared().join("data").join(name);
        for d in read_corpus(&dir.join("corpus.jsonl")).unwrap() {
            texts.push(d.text);
        }
        for q in read_queries(&dir.join("queries.jsonl")).unwrap() {
            texts.push(q.text);
        }
    }
    texts.extend(random_strings(3000, 7));
    texts
}

/// Compares the two backends on `texts` for the tokenizer file `path`; returns how many texts
/// were compared.
fn compare(path: &Path, max_length: usize, texts: &[String]) -> usize {
    let ours = TextTokenizer::from_file(path, max_length).unwrap();
    assert!(
        ours.is_wordpiece(),
        "{} was not taken as WordPiece",
        path.display()
    );
    let theirs = TextTokenizer::from_file_with_crate(path, max_length).unwrap();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let want = theirs.encode_batch(&refs).unwrap();
    let got = ours.encode_batch(&refs).unwrap();
    let (mut scratch, mut ids, mut types) = (Scratch::default(), Vec::new(), Vec::new());
    for ((text, w), g) in texts.iter().zip(&want).zip(&got) {
        assert_eq!(
            g.ids,
            w.ids,
            "{} at max length {max_length}: {text:?}",
            path.display()
        );
        assert_eq!(g.type_ids, w.type_ids);
        ours.encode_into(text, &mut scratch, &mut ids, &mut types)
            .unwrap();
        assert_eq!(ids, w.ids, "encode_into: {text:?}");
        assert_eq!(types, w.type_ids);
    }
    texts.len()
}

fn tiny_bert_tokenizer() -> std::path::PathBuf {
    common::shared().join("fixtures/tiny-bert/tokenizer.json")
}

#[test]
fn same_ids_as_the_tokenizers_crate() {
    let texts = all_texts();
    assert!(texts.len() > 10_000);
    for max_length in [2, 3, 16, 256, 512] {
        compare(&tiny_bert_tokenizer(), max_length, &texts);
    }
}

/// Each normaliser switch and the word-length limit changed in the file, on the edge cases,
/// the fixture sentences and the random strings (the collections are ASCII-heavy: they add
/// little here).
#[test]
fn same_ids_with_other_normaliser_settings() {
    let mut texts = edge_cases();
    texts.extend(common::minilm_sentences());
    texts.extend(random_strings(2000, 11));
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny_bert_tokenizer()).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    type Change = Box<dyn Fn(&mut serde_json::Value)>;
    let variants: Vec<(&str, Change)> = vec![
        (
            "cased",
            Box::new(|j| j["normalizer"]["lowercase"] = false.into()),
        ),
        (
            "lowercase without stripping",
            Box::new(|j| j["normalizer"]["strip_accents"] = false.into()),
        ),
        (
            "stripping without lowercase",
            Box::new(|j| {
                j["normalizer"]["lowercase"] = false.into();
                j["normalizer"]["strip_accents"] = true.into();
            }),
        ),
        (
            "no CJK split",
            Box::new(|j| j["normalizer"]["handle_chinese_chars"] = false.into()),
        ),
        (
            "no cleaning",
            Box::new(|j| j["normalizer"]["clean_text"] = false.into()),
        ),
        (
            "words of at most 5 characters",
            Box::new(|j| j["model"]["max_input_chars_per_word"] = 5.into()),
        ),
        (
            "no added tokens",
            Box::new(|j| j["added_tokens"] = serde_json::json!([])),
        ),
    ];
    for (name, change) in variants {
        let mut j = base.clone();
        change(&mut j);
        let path = dir.path().join(format!("{}.json", name.replace(' ', "-")));
        std::fs::write(&path, serde_json::to_string(&j).unwrap()).unwrap();
        for max_length in [5, 128] {
            compare(&path, max_length, &texts);
        }
    }
}

/// Files this tokenizer does not reproduce are left to the crate, not mis-tokenized.
#[test]
fn other_pipelines_fall_back_to_the_crate() {
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny_bert_tokenizer()).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut stripped = base.clone();
    stripped["added_tokens"][4]["lstrip"] = true.into();
    let mut normalized = base.clone();
    normalized["added_tokens"][0]["normalized"] = true.into();
    let mut lowercase_only = base.clone();
    lowercase_only["normalizer"] = serde_json::json!({"type": "Lowercase"});
    let mut no_template = base.clone();
    no_template["post_processor"] = serde_json::Value::Null;
    for (i, j) in [stripped, normalized, lowercase_only, no_template]
        .iter()
        .enumerate()
    {
        let path = dir.path().join(format!("{i}.json"));
        std::fs::write(&path, serde_json::to_string(j).unwrap()).unwrap();
        let t = TextTokenizer::from_file(&path, 32).unwrap();
        assert!(!t.is_wordpiece(), "variant {i}");
        assert!(!t.encode_batch(&["a text"]).unwrap()[0].ids.is_empty());
    }
}
