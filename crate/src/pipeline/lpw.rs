//! Long and weighted prompts as diffusers' community pipeline `lpw_stable_diffusion_xl.py`
//! ("long prompt weighting") prepares them for `get_weighted_text_embeddings_sdxl`: AUTOMATIC1111's
//! attention syntax parsed into (text, weight) pieces, each piece tokenized on its own, the tokens
//! cut into windows of 75 that the text encoders see one at a time as `bos + tokens + eos`.
//! The GPU half (encoding the windows, applying the weights) is in `prompt.rs`.

use crate::error::{Error, Result};
use crate::tokenizer::ClipTokenizer;

/// Tokens per window between bos and eos (CLIP's 77 positions less those two).
pub const WINDOW: usize = 75;

/// Brackets open at once at most. A closing bracket re-weights every piece since its opening one,
/// so each piece is re-weighted once per bracket around it: bounding the depth keeps parsing
/// linear (a prompt of 80k "(" would otherwise take quadratic time). Prompts nest a handful deep.
pub const MAX_NESTING: usize = 64;

/// lpw's `parse_prompt_attention` (A1111's syntax): `(text)` multiplies the weight by 1.1,
/// `[text]` divides it by 1.1, `(text:1.5)` multiplies it by 1.5, brackets nest, `\(` `\)` `\[`
/// `\]` `\\` are literal characters (a lone `\` disappears), an unclosed bracket applies to the
/// rest of the prompt, a stray closing bracket is literal text, and `BREAK` becomes the piece
/// `("BREAK", -1)` (lpw has no chunk break: the word is encoded with weight -1). Runs of equal
/// weight are merged. The errors are a weight lpw's `float()` rejects, such as `(a:1.2.3)`, and
/// brackets nested deeper than [`MAX_NESTING`].
pub fn parse_prompt_attention(text: &str) -> Result<Vec<(String, f64)>> {
    let mut pieces: Vec<(String, f64)> = Vec::new();
    let (mut round, mut square) = (Vec::new(), Vec::new());
    let multiply = |pieces: &mut Vec<(String, f64)>, from: usize, by: f64| pieces[from..].iter_mut().for_each(|p| p.1 *= by);
    let mut rest = text;
    while !rest.is_empty() {
        let (token, len) = next_token(rest);
        let literal = &rest[..len];
        rest = &rest[len..];
        if matches!(token, Token::Open(_)) && round.len() + square.len() == MAX_NESTING {
            return Err(Error::InvalidParameter(format!("the prompt nests brackets more than {MAX_NESTING} deep (escape literal ones as \\( \\[)")));
        }
        match token {
            Token::Escaped(c) => pieces.push((c.to_string(), 1.0)),
            Token::Open('(') => round.push(pieces.len()),
            Token::Open(_) => square.push(pieces.len()),
            Token::Weight(w) if !round.is_empty() => {
                let weight: f64 = w.parse().map_err(|_| Error::InvalidParameter(format!("prompt weight '{w}' in '{literal}' is not a number")))?;
                multiply(&mut pieces, round.pop().expect("not empty"), weight);
            }
            Token::Close(')') if !round.is_empty() => multiply(&mut pieces, round.pop().expect("not empty"), 1.1),
            Token::Close(']') if !square.is_empty() => multiply(&mut pieces, square.pop().expect("not empty"), 1.0 / 1.1),
            _ => push_text(&mut pieces, literal),
        }
    }
    for from in round {
        multiply(&mut pieces, from, 1.1);
    }
    for from in square {
        multiply(&mut pieces, from, 1.0 / 1.1);
    }
    if pieces.is_empty() {
        pieces.push((String::new(), 1.0));
    }
    let mut merged: Vec<(String, f64)> = Vec::with_capacity(pieces.len());
    for (text, weight) in pieces {
        match merged.last_mut() {
            Some(last) if last.1 == weight => last.0.push_str(&text),
            _ => merged.push((text, weight)),
        }
    }
    Ok(merged)
}

/// One match of lpw's `re_attention` pattern.
enum Token<'a> {
    /// `\(`, `\)`, `\[`, `\]`, `\\` give the character; a lone `\` gives "".
    Escaped(&'a str),
    Open(char),
    /// `:1.5)`: the weight's text, not yet parsed.
    Weight(&'a str),
    Close(char),
    /// Anything else, kept as text.
    Text,
}

/// The first alternative of `re_attention` that matches at the start of `s` (non-empty), and its
/// length in bytes. Weights take ASCII digits only (Python's `\d` also takes other scripts' digits).
fn next_token(s: &str) -> (Token<'_>, usize) {
    const SPECIAL: &[char] = &['\\', '(', ')', '[', ']', ':'];
    let bytes = s.as_bytes();
    match bytes[0] {
        b'\\' => match bytes.get(1) {
            Some(b'(' | b')' | b'[' | b']' | b'\\') => (Token::Escaped(&s[1..2]), 2),
            _ => (Token::Escaped(""), 1),
        },
        b'(' => (Token::Open('('), 1),
        b'[' => (Token::Open('['), 1),
        b')' => (Token::Close(')'), 1),
        b']' => (Token::Close(']'), 1),
        b':' => {
            let sign = usize::from(matches!(bytes.get(1), Some(b'+' | b'-')));
            let digits = bytes[1 + sign..].iter().take_while(|b| b.is_ascii_digit() || **b == b'.').count();
            match bytes.get(1 + sign + digits) {
                Some(b')') if digits > 0 => (Token::Weight(&s[1..1 + sign + digits]), 2 + sign + digits),
                _ => (Token::Text, 1),
            }
        }
        _ => (Token::Text, s.find(SPECIAL).unwrap_or(s.len())),
    }
}

/// lpw's text branch: `re.split(r"\s*\bBREAK\b\s*", text)`, a ("BREAK", -1) piece between the parts.
fn push_text(pieces: &mut Vec<(String, f64)>, text: &str) {
    let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    let mut part_start = 0;
    for (at, _) in text.match_indices("BREAK") {
        let end = at + "BREAK".len();
        if at < part_start || word(text[..at].chars().next_back()) || word(text[end..].chars().next()) {
            continue;
        }
        let part_end = part_start + text[part_start..at].trim_end().len();
        pieces.push((text[part_start..part_end].to_string(), 1.0));
        pieces.push(("BREAK".to_string(), -1.0));
        part_start = end + (text[end..].len() - text[end..].trim_start().len());
    }
    pieces.push((text[part_start..].to_string(), 1.0));
}

/// A text's tokens (no bos/eos) and each token's weight, as lpw's `get_prompts_tokens_with_weights`.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightedTokens {
    pub ids: Vec<u32>,
    pub weights: Vec<f64>,
}

impl WeightedTokens {
    /// `weighting` off reads the whole text literally, as one piece of weight 1.
    pub fn new(tokenizer: &ClipTokenizer, text: &str, weighting: bool) -> Result<WeightedTokens> {
        let pieces = if weighting { parse_prompt_attention(text)? } else { vec![(text.to_string(), 1.0)] };
        let (mut ids, mut weights) = (Vec::new(), Vec::new());
        for (piece, weight) in pieces {
            let piece_ids = tokenizer.tokens(&piece)?;
            weights.resize(weights.len() + piece_ids.len(), weight);
            ids.extend(piece_ids);
        }
        Ok(WeightedTokens { ids, weights })
    }

    /// Pads with `eos` (weight 1) to `len` tokens, as lpw evens out a prompt and its negative.
    pub fn pad_to(&mut self, len: usize, eos: u32) {
        if self.ids.len() < len {
            self.ids.resize(len, eos);
            self.weights.resize(len, 1.0);
        }
    }

    pub fn truncate(&mut self, len: usize) {
        self.ids.truncate(len);
        self.weights.truncate(len);
    }

    /// lpw's `group_tokens_and_weights` (pad_last_block=False): windows of `WINDOW` tokens as
    /// `bos + tokens + eos`, the last one shorter (not padded); bos/eos weigh 1. Weights are
    /// rounded to f16 as lpw's `torch.tensor(weights, dtype=torch.float16)` does.
    pub fn windows(&self, bos: u32, eos: u32) -> Result<Vec<(Vec<u32>, Vec<f32>)>> {
        let mut windows = Vec::with_capacity(self.ids.len().div_ceil(WINDOW));
        for (ids, weights) in self.ids.chunks(WINDOW).zip(self.weights.chunks(WINDOW)) {
            let mut rounded = vec![1.0];
            for &w in weights {
                let half = half::f16::from_f64(w);
                if !half.is_finite() {
                    return Err(Error::InvalidParameter(format!("prompt weight {w} is outside the float16 range that lpw's weights hold (±65504)")));
                }
                rounded.push(half.to_f32());
            }
            rounded.push(1.0);
            windows.push(([&[bos], ids, &[eos]].concat(), rounded));
        }
        Ok(windows)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_prompt_attention;

    fn parsed(text: &str) -> Vec<(String, f64)> {
        parse_prompt_attention(text).unwrap()
    }

    fn pieces(list: &[(&str, f64)]) -> Vec<(String, f64)> {
        list.iter().map(|(t, w)| (t.to_string(), *w)).collect()
    }

    /// Seconds of the fastest of five runs of `a` and of `b`, run in turns (so that a busy
    /// machine slows both alike).
    fn fastest(a: impl Fn(), b: impl Fn()) -> (f64, f64) {
        let time = |f: &dyn Fn()| {
            let start = std::time::Instant::now();
            f();
            start.elapsed().as_secs_f64()
        };
        (0..5).fold((f64::INFINITY, f64::INFINITY), |(x, y), _| (x.min(time(&a)), y.min(time(&b))))
    }

    /// A prompt sixteen times as long parses in about sixteen times the time (quadratic: 256; the
    /// 64× bound leaves room for a busy machine), deep nesting included; brackets past MAX_NESTING
    /// are refused at once.
    #[test]
    fn parsing_is_linear() {
        let nested = |n: usize| format!("{}{}", "(a [b ".repeat(n / 2), ") c]".repeat(n / 2));
        let prompt = |n: usize| format!("{}{}", "(word:1.2) [x] ((y)) \\( z BREAK ".repeat(n), nested(super::MAX_NESTING).repeat(n / 8));
        let (small, large) = (prompt(500), prompt(8000));
        let (small, large) = fastest(|| drop(parsed(&small)), || drop(parsed(&large)));
        assert!(large < 64.0 * small, "500 → {small:.4} s, 8000 → {large:.4} s: not linear");
        let start = std::time::Instant::now();
        let err = parse_prompt_attention(&"(".repeat(100_000)).unwrap_err();
        assert!(err.to_string().contains("more than 64 deep") && start.elapsed().as_secs_f64() < 0.5, "{err}");
        assert_eq!(parsed(&format!("{}a{}", "(".repeat(64), ")".repeat(64)))[0].0, "a", "64 deep is fine");
    }

    /// The examples in lpw's `parse_prompt_attention` docstring.
    #[test]
    fn docstring_examples() {
        assert_eq!(parsed("normal text"), pieces(&[("normal text", 1.0)]));
        assert_eq!(parsed("an (important) word"), pieces(&[("an ", 1.0), ("important", 1.1), (" word", 1.0)]));
        assert_eq!(parsed("(unbalanced"), pieces(&[("unbalanced", 1.1)]));
        assert_eq!(parsed("\\(literal\\]"), pieces(&[("(literal]", 1.0)]));
        assert_eq!(parsed("(unnecessary)(parens)"), pieces(&[("unnecessaryparens", 1.1)]));
        assert_eq!(
            parsed("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
            pieces(&[
                ("a ", 1.0),
                ("house", 1.3 * 1.1 * 1.1),
                (" ", 1.1),
                ("on", 1.0 / 1.1 * 1.1),
                (" a ", 1.1),
                ("hill", 0.5 * 1.1),
                (", sun, ", 1.1),
                ("sky", 1.1 * 1.1 * 1.1 * 1.1),
                (".", 1.1),
            ])
        );
    }

    #[test]
    fn stray_brackets_breaks_and_bad_weights() {
        assert_eq!(parsed("a) b] c:1.5) d:"), pieces(&[("a) b] c:1.5) d:", 1.0)]));
        assert_eq!(parsed("x BREAK y"), pieces(&[("x", 1.0), ("BREAK", -1.0), ("y", 1.0)]));
        assert_eq!(parsed("xBREAK y"), pieces(&[("xBREAK y", 1.0)]));
        assert_eq!(parsed("a \\ b"), pieces(&[("a  b", 1.0)]));
        assert_eq!(parsed(""), pieces(&[("", 1.0)]));
        assert_eq!(parsed("(a:-.5)"), pieces(&[("a", -0.5)]));
        assert!(parse_prompt_attention("(a:1.2.3)").is_err());
        assert!(parse_prompt_attention("(a:.)").is_err());
    }
}
