//! CLIP BPE tokenizer as diffusers uses it (transformers' slow `CLIPTokenizer` with ftfy):
//! text cleaning, byte-level BPE from `vocab.json` + `merges.txt`, bos + tokens + eos truncated
//! to `model_max_length`, padded with the folder's pad token. SDXL's tokenizer_2 pads with "!"
//! (id 0), and — because "!" is then a special token — any "!" in the prompt also becomes id 0.

use std::collections::HashMap;

use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::Split;
use tokenizers::{NormalizedString, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};
use crate::weights::{read_json, Source};

/// CLIP's pre-tokenization pattern (transformers' CLIPTokenizer.pat; the text is already lowercased).
const CLIP_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

pub struct ClipTokenizer {
    inner: Tokenizer,
    /// Special tokens with their ids, longest first: split out of the raw text before cleaning.
    specials: Vec<(String, u32)>,
    pub bos_id: u32,
    pub eos_id: u32,
    pub pad_id: u32,
    pub max_length: usize,
}

/// A special token in tokenizer_config.json / special_tokens_map.json: a string or {"content": ..}.
fn token_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl ClipTokenizer {
    /// Loads `dir/vocab.json`, `dir/merges.txt` and the special tokens of `dir`'s configs.
    pub async fn load(source: &impl Source, dir: &str) -> Result<ClipTokenizer> {
        let path = |f: &str| format!("{dir}/{f}");
        let err = |f: &str, message: String| Error::Tokenizer { path: source.describe(&path(f)), message };
        let vocab: HashMap<String, u32> = read_json(source, &path("vocab.json")).await?;
        let merges_text = String::from_utf8(source.read(&path("merges.txt")).await?)
            .map_err(|_| err("merges.txt", "not UTF-8".into()))?;
        let merges = merges_text
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .map(|l| {
                l.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| err("merges.txt", format!("malformed merge line '{l}'")))
            })
            .collect::<Result<Vec<_>>>()?;

        let mut config = serde_json::Map::new();
        for file in ["special_tokens_map.json", "tokenizer_config.json"] {
            if source.exists(&path(file)).await {
                if let Value::Object(o) = read_json(source, &path(file)).await? {
                    config.extend(o);
                }
            }
        }
        let special = |key: &str, default: &str| config.get(key).and_then(token_text).unwrap_or_else(|| default.to_string());
        let (bos, eos) = (special("bos_token", "<|startoftext|>"), special("eos_token", "<|endoftext|>"));
        let (unk, pad) = (special("unk_token", "<|endoftext|>"), special("pad_token", "<|endoftext|>"));
        let max_length = config.get("model_max_length").and_then(Value::as_f64).filter(|n| (2.0..=1e6).contains(n)).unwrap_or(77.0) as usize;
        let id = |t: &str| vocab.get(t).copied().ok_or_else(|| err("vocab.json", format!("special token '{t}' is not in the vocabulary")));
        let (bos_id, eos_id, pad_id, unk_id) = (id(&bos)?, id(&eos)?, id(&pad)?, id(&unk)?);

        let bpe = BPE::builder()
            .vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), merges)
            .unk_token(unk.clone())
            .end_of_word_suffix("</w>".into())
            .build()
            .map_err(|e| err("vocab.json", e.to_string()))?;
        let mut inner = Tokenizer::new(bpe);
        let split = Split::new(tokenizers::pre_tokenizers::split::SplitPattern::Regex(CLIP_PATTERN.into()), SplitDelimiterBehavior::Removed, true)
            .map_err(|e| err("vocab.json", e.to_string()))?;
        inner.with_pre_tokenizer(Some(Sequence::new(vec![split.into(), ByteLevel::new(false, false, false).into()])));
        let mut specials = vec![(bos, bos_id), (eos, eos_id), (unk.clone(), unk_id), (pad, pad_id)];
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        specials.dedup();
        Ok(ClipTokenizer { inner, specials, bos_id, eos_id, pad_id, max_length })
    }

    /// Token ids of `text`: bos, at most max_length - 2 tokens, eos, then padding to max_length.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let body = self.tokens(text)?;
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend(body.iter().take(self.max_length - 2));
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(ids)
    }

    /// Token ids of `text` without bos/eos, truncation or padding (`tokenizer(text).input_ids[1:-1]`).
    pub fn tokens(&self, text: &str) -> Result<Vec<u32>> {
        let mut body = Vec::new();
        let mut start = 0;
        // Each special token's next occurrence at or after `start` (None: no more). A position is
        // searched again only once `start` has passed it, so every search moves forward: linear
        // in the text, not quadratic when one special token repeats ("!" × 80k).
        let mut next: Vec<Option<usize>> = self.specials.iter().map(|(token, _)| text.find(token.as_str())).collect();
        // As transformers: special tokens are matched in the raw text (so a full-width "！" that
        // cleaning turns into "!" stays an ordinary token), then each piece is cleaned and BPE'd.
        while start < text.len() {
            for ((token, _), at) in self.specials.iter().zip(next.iter_mut()) {
                if at.is_some_and(|at| at < start) {
                    *at = text[start..].find(token.as_str()).map(|i| start + i);
                }
            }
            let found = self.specials.iter().zip(&next).filter_map(|((t, id), at)| at.map(|at| (at, t.len(), *id))).min_by_key(|&(at, len, _)| (at, usize::MAX - len));
            let (piece, special) = match found {
                Some((at, len, id)) => {
                    let piece = &text[start..at];
                    start = at + len;
                    (piece, Some(id))
                }
                None => (&text[std::mem::replace(&mut start, text.len())..], None),
            };
            let cleaned = clean_text(piece);
            if !cleaned.is_empty() {
                let encoding = self
                    .inner
                    .encode(cleaned.as_str(), false)
                    .map_err(|e| Error::Tokenizer { path: "<prompt>".into(), message: e.to_string() })?;
                body.extend_from_slice(encoding.get_ids());
            }
            body.extend(special);
        }
        Ok(body)
    }
}

/// transformers' CLIP text cleaning with ftfy: `whitespace_clean(ftfy.fix_text(text)).lower()`.
/// Of ftfy's fixes this applies the ones that change ordinary prompts: curly quotes, Latin
/// ligatures, full/half-width forms, control characters and NFC. (Mojibake repair and HTML
/// entity unescaping are not reproduced.)
pub fn clean_text(text: &str) -> String {
    let mut fixed = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\u{2018}'..='\u{201b}' | '\u{02bc}' => fixed.push('\''),
            '\u{201c}'..='\u{201f}' => fixed.push('"'),
            '\u{3000}' | '\u{ff01}'..='\u{ffef}' => {
                let mut n = NormalizedString::from(c.to_string());
                n.nfkc();
                fixed.push_str(n.get());
            }
            c if c.is_control() && !c.is_whitespace() => {}
            c => match ligature(c) {
                Some(s) => fixed.push_str(s),
                None => fixed.push(c),
            },
        }
    }
    let mut n = NormalizedString::from(fixed);
    n.nfc();
    n.get().split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

/// ftfy's fix_latin_ligatures table.
fn ligature(c: char) -> Option<&'static str> {
    Some(match c {
        'Ĳ' => "IJ",
        'ĳ' => "ij",
        'ŉ' => "ʼn",
        'Ǳ' => "DZ",
        'ǲ' => "Dz",
        'ǳ' => "dz",
        'Ǆ' => "DŽ",
        'ǅ' => "Dž",
        'ǆ' => "dž",
        'Ǉ' => "LJ",
        'ǈ' => "Lj",
        'ǉ' => "lj",
        'Ǌ' => "NJ",
        'ǋ' => "Nj",
        'ǌ' => "nj",
        'ﬀ' => "ff",
        'ﬁ' => "fi",
        'ﬂ' => "fl",
        'ﬃ' => "ffi",
        'ﬄ' => "ffl",
        'ﬅ' => "ſt",
        'ﬆ' => "st",
        _ => return None,
    })
}
