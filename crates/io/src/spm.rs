//! SentencePiece-style BPE tokenizers (`tokenizer.ggml.model = llama`: Gemma, Llama 1/2,
//! Mistral) rebuilt from GGUF metadata, which stores pieces and scores but no merges.
//!
//! SentencePiece BPE merges, among adjacent symbols, the pair whose concatenation is the piece
//! with the highest score. A byte-pair merge list ordered by the score of the merged piece does
//! the same with Hugging Face's BPE, so the merges are derived here: every split of every piece
//! into two pieces, ranked by the whole piece's score. Spaces become `▁` before merging;
//! characters outside the vocabulary fall back to `<0xXX>` byte tokens.

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::prepend::Prepend;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::Sequence as NormalizerSequence;
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper};

/// GGUF token types.
const NORMAL: u64 = 1;
const UNKNOWN: u64 = 2;
const CONTROL: u64 = 3;
const USER_DEFINED: u64 = 4;

/// The SentencePiece word-boundary mark that stands for a space.
const SPACE_MARK: &str = "\u{2581}";

/// A tokenizer from pieces, their scores and GGUF token types; `add_space_prefix` puts a `▁`
/// before the text, as SentencePiece does unless told otherwise. `Err(msg)` on inconsistent
/// metadata.
pub fn tokenizer(
    pieces: &[&str],
    scores: &[f64],
    types: &[u64],
    add_space_prefix: bool,
) -> Result<tokenizers::Tokenizer, String> {
    if scores.len() != pieces.len() || types.len() != pieces.len() {
        return Err(format!(
            "{} pieces but {} scores and {} token types",
            pieces.len(),
            scores.len(),
            types.len()
        ));
    }
    let vocab: tokenizers::models::bpe::Vocab = pieces
        .iter()
        .enumerate()
        .map(|(i, p)| (p.to_string(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab.clone(), merges(pieces, scores, types, &vocab))
        .byte_fallback(true)
        .unk_token(
            types
                .iter()
                .position(|&t| t == UNKNOWN)
                .map_or("<unk>".to_string(), |i| pieces[i].to_string()),
        )
        .fuse_unk(true)
        .build()
        .map_err(|e| e.to_string())?;
    let mut inner = tokenizers::Tokenizer::new(bpe);

    let replace = |from: &str, to: &str| Replace::new(from, to).map_err(|e| e.to_string());
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        normalizers.push(Prepend::new(SPACE_MARK.to_string()).into());
    }
    normalizers.push(replace(" ", SPACE_MARK)?.into());
    inner.with_normalizer(Some(NormalizerSequence::new(normalizers)));
    let mut decoders: Vec<DecoderWrapper> = vec![
        replace(SPACE_MARK, " ")?.into(),
        ByteFallback::default().into(),
        Fuse::default().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    inner.with_decoder(Some(DecoderSequence::new(decoders)));

    // Control tokens are special; user-defined ones (Gemma's `\n`, `\n\n`, HTML tags) are
    // matched whole before merging, as llama.cpp does, but are ordinary text.
    let added = |ty: u64, special: bool| -> Vec<AddedToken> {
        pieces
            .iter()
            .zip(types)
            .filter(|(_, &t)| t == ty)
            .map(|(p, _)| AddedToken::from(p.to_string(), special).normalized(false))
            .collect()
    };
    inner.add_special_tokens(&added(CONTROL, true));
    inner.add_tokens(&added(USER_DEFINED, false));
    Ok(inner)
}

/// Every `(left, right)` whose concatenation is a normal piece and whose halves are pieces,
/// best merged piece first (ties: longer left half first, then vocabulary order).
fn merges(
    pieces: &[&str],
    scores: &[f64],
    types: &[u64],
    vocab: &tokenizers::models::bpe::Vocab,
) -> Vec<(String, String)> {
    let mut ranked: Vec<(f64, usize, u32, u32, usize)> = Vec::new();
    for (id, piece) in pieces.iter().enumerate() {
        if types[id] != NORMAL {
            continue;
        }
        for (cut, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(cut);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                ranked.push((scores[id], l.len(), li, ri, id));
            }
        }
    }
    ranked.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(b.1.cmp(&a.1))
            .then(a.4.cmp(&b.4))
            .then(a.2.cmp(&b.2))
    });
    ranked
        .into_iter()
        .map(|(_, _, l, r, _)| {
            (
                pieces[l as usize].to_string(),
                pieces[r as usize].to_string(),
            )
        })
        .collect()
}
