//! Comparing what nodes of one model answered to the same canary: with each
//! other (the majority) or with what the operator pinned.

use std::collections::HashMap;

/// A verdict on one node's answer to one canary.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Verdict {
    /// It agreed with the majority or the pinned reference.
    Pass,
    /// It did not; why, in words its provider may read.
    Suspect(String),
    /// Nothing can be said (no majority, a lone node and no reference, the
    /// call failed: failures are the breaker's business).
    Inconclusive,
}

/// The cosine similarity of two vectors; 0 when their lengths differ, either
/// is empty or zero, or either holds a value that is not finite (a vector a
/// model could not have produced agrees with nothing).
pub(crate) fn cosine(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() || a.is_empty() {
        return 0.0;
    }
    let (mut dot, mut na, mut nb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    let c = dot / (na.sqrt() * nb.sqrt());
    if c.is_finite() {
        c
    } else {
        0.0
    }
}

/// The first `n` whitespace-separated tokens of `text`, joined by one space:
/// what nodes of one model at temperature 0 with one seed must agree on.
/// Later tokens may drift on honest hardware (batching, kernels).
pub(crate) fn prefix(text: &str, n: usize) -> String {
    text.split_whitespace()
        .take(n)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The majority of a pool's answers, by `agree`: the largest group of
/// answers that agree with one anchor, if it has at least two members and
/// more than half of the answers. Members pass, the others are suspect
/// (`why` says how they differ from the anchor); without such a group every
/// answer is inconclusive. `None` answers (failed calls) are inconclusive
/// and do not count.
pub(crate) fn by_majority<T>(
    answers: &[Option<T>],
    agree: impl Fn(&T, &T) -> bool,
    why: impl Fn(&T, &T) -> String,
) -> Vec<Verdict> {
    let present: Vec<(usize, &T)> = (answers.iter().enumerate())
        .filter_map(|(i, a)| a.as_ref().map(|a| (i, a)))
        .collect();
    let n = present.len();
    let group_of = |anchor: &T| -> Vec<usize> {
        (present.iter())
            .filter(|(_, b)| agree(anchor, b))
            .map(|(i, _)| *i)
            .collect()
    };
    let best = (present.iter())
        .map(|(_, a)| (group_of(a), *a))
        .max_by_key(|(g, _)| g.len());
    let mut out = vec![Verdict::Inconclusive; answers.len()];
    let Some((group, anchor)) = best else {
        return out;
    };
    if group.len() < 2 || group.len() * 2 <= n {
        return out;
    }
    for (i, a) in &present {
        out[*i] = if group.contains(i) {
            Verdict::Pass
        } else {
            Verdict::Suspect(why(a, anchor))
        };
    }
    out
}

/// Chat answers by majority of their first `tokens` tokens.
pub(crate) fn chat_by_majority(answers: &[Option<String>], tokens: usize) -> Vec<Verdict> {
    let prefixes: Vec<Option<String>> = (answers.iter())
        .map(|a| a.as_deref().map(|t| prefix(t, tokens)))
        .collect();
    // Counted once per distinct prefix, not per pair: a pool may be large.
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for p in prefixes.iter().flatten() {
        *counts.entry(p.as_str()).or_default() += 1;
    }
    let n: usize = counts.values().sum();
    let Some((top, size)) = counts.iter().max_by_key(|(_, c)| **c) else {
        return vec![Verdict::Inconclusive; answers.len()];
    };
    if *size < 2 || size * 2 <= n {
        return vec![Verdict::Inconclusive; answers.len()];
    }
    let top = top.to_string();
    (prefixes.iter())
        .map(|p| match p {
            None => Verdict::Inconclusive,
            Some(p) if *p == top => Verdict::Pass,
            Some(_) => Verdict::Suspect(format!(
                "its chat answer's first {tokens} tokens differed from the other nodes' \
                 (temperature 0, one seed)"
            )),
        })
        .collect()
}

/// Embedding answers by majority: two agree when their cosine is at least
/// `min_cosine`.
pub(crate) fn embeddings_by_majority(
    answers: &[Option<Vec<f64>>],
    min_cosine: f64,
) -> Vec<Verdict> {
    by_majority(
        answers,
        |a, b| cosine(a, b) >= min_cosine,
        |a, anchor| {
            format!(
                "its embedding disagreed with the other nodes' (cosine {:.3}, tolerance {min_cosine:.3})",
                cosine(a, anchor)
            )
        },
    )
}

/// A chat answer against a pinned answer: its first `tokens` tokens must be
/// the pinned text's.
pub(crate) fn chat_against(answer: Option<&str>, pinned: &str, tokens: usize) -> Verdict {
    match answer {
        None => Verdict::Inconclusive,
        Some(a) if prefix(a, tokens) == prefix(pinned, tokens) => Verdict::Pass,
        Some(_) => Verdict::Suspect(format!(
            "its chat answer to a prompt with a known answer was wrong (first {tokens} tokens)"
        )),
    }
}

/// An embedding against a pinned vector.
pub(crate) fn embedding_against(
    answer: Option<&[f64]>,
    pinned: &[f64],
    min_cosine: f64,
) -> Verdict {
    match answer {
        None => Verdict::Inconclusive,
        Some(a) => {
            let c = cosine(a, pinned);
            if c >= min_cosine {
                Verdict::Pass
            } else {
                Verdict::Suspect(format!(
                    "its embedding disagreed with the operator's reference vector (cosine {c:.3}, \
                     tolerance {min_cosine:.3})"
                ))
            }
        }
    }
}

/// Speech for a text of `chars` characters: a WAV whose duration is
/// plausible for it, between `chars / max_cps` and `chars / min_cps`
/// seconds (people and engines speak some 10 to 20 characters a second at
/// normal speed).
pub(crate) fn speech_plausible(
    audio: Option<&[u8]>,
    chars: usize,
    (min_cps, max_cps): (f64, f64),
) -> Verdict {
    let Some(audio) = audio else {
        return Verdict::Inconclusive;
    };
    let Some(secs) = super::canary::wav_seconds(audio) else {
        return Verdict::Suspect("its speech was not the WAV audio asked for".into());
    };
    let (lo, hi) = (chars as f64 / max_cps, chars as f64 / min_cps);
    if (lo..=hi).contains(&secs) {
        Verdict::Pass
    } else {
        Verdict::Suspect(format!(
            "its speech lasted {secs:.2} s for {chars} characters (plausible: {lo:.2} to {hi:.2} s)"
        ))
    }
}

/// A scrape answer for a page holding `text`: its content must hold the
/// page's words in order (nine in ten at least: formats differ in how they
/// break and mark up text). A node that says it could not fetch the page
/// earns nothing for it and says nothing about the model (its egress rules
/// may refuse the page's address).
pub(crate) fn page_returned(answer: Option<&[u8]>, text: &str) -> Verdict {
    let Some(body) = answer else {
        return Verdict::Inconclusive;
    };
    let content = match super::canary::scraped_content(body) {
        Err(()) => return Verdict::Suspect("its scrape answer could not be read".into()),
        Ok(None) => return Verdict::Inconclusive,
        Ok(Some(c)) => c,
    };
    let words = |s: &str| -> Vec<String> {
        s.split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect()
    };
    let (want, mut got) = (words(text), words(&content));
    // The page is a few dozen words: what comes after the first pages' worth
    // of an answer cannot help it, and a huge answer costs no more to judge.
    got.truncate(want.len() * 20 + 1_000);
    let (mut at, mut found) = (0, 0);
    for w in &want {
        // A word missing (or broken by markup) skips itself, not the rest.
        if let Some(k) = got[at..].iter().position(|g| g == w) {
            at += k + 1;
            found += 1;
        }
    }
    if found * 10 >= want.len() * 9 {
        Verdict::Pass
    } else {
        Verdict::Suspect(format!(
            "its scrape of a page returned {found} of the page's {} words",
            want.len()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_of_odd_vectors_agrees_with_nothing() {
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-12);
        assert_eq!(cosine(&[1.0, 2.0], &[1.0]), 0.0);
        assert_eq!(cosine(&[], &[]), 0.0);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 1.0]), 0.0);
        assert_eq!(cosine(&[f64::NAN, 1.0], &[1.0, 1.0]), 0.0);
        assert_eq!(cosine(&[f64::INFINITY, 1.0], &[1.0, 1.0]), 0.0);
    }

    #[test]
    fn a_majority_needs_two_and_more_than_half() {
        let v = |x: f64| Some(vec![1.0, x]);
        let far = Some(vec![-1.0, 0.0]);
        let r = embeddings_by_majority(&[v(0.0), v(0.01), far.clone()], 0.99);
        assert_eq!(r[..2], [Verdict::Pass, Verdict::Pass]);
        assert!(matches!(r[2], Verdict::Suspect(_)));
        // Two that disagree, or one alone: nothing can be said.
        let r = embeddings_by_majority(&[v(0.0), far.clone()], 0.99);
        assert_eq!(r, vec![Verdict::Inconclusive; 2]);
        assert_eq!(
            embeddings_by_majority(&[v(0.0)], 0.99),
            vec![Verdict::Inconclusive]
        );
        // Two against two: no majority.
        let r = embeddings_by_majority(&[v(0.0), v(0.0), far.clone(), far.clone()], 0.99);
        assert_eq!(r, vec![Verdict::Inconclusive; 4]);
        // A failed call neither counts nor is judged.
        let r = embeddings_by_majority(&[v(0.0), None, v(0.0), far], 0.99);
        assert_eq!(r[1], Verdict::Inconclusive);
        assert!(matches!(r[3], Verdict::Suspect(_)));
    }

    #[test]
    fn chat_answers_agree_on_their_first_tokens() {
        let s = |t: &str| Some(t.to_owned());
        let r = chat_by_majority(&[s("a b c d x"), s("a  b c d y"), s("a b z d")], 4);
        assert_eq!(r[..2], [Verdict::Pass, Verdict::Pass]);
        assert!(matches!(r[2], Verdict::Suspect(_)));
        assert_eq!(chat_against(Some("42 is it"), "42", 1), Verdict::Pass);
        assert!(matches!(
            chat_against(Some("41"), "42", 1),
            Verdict::Suspect(_)
        ));
    }

    #[test]
    fn a_page_comes_back_when_its_words_do_in_order() {
        let text = "Golden river market.\nQuiet stone bridge at night.";
        let answer = |content: &str| {
            let r =
                serde_json::json!({"results": [{"url": "u", "success": true, "content": content}]});
            r.to_string().into_bytes()
        };
        let html = super::super::canary::page_html(text);
        assert_eq!(page_returned(Some(&answer(&html)), text), Verdict::Pass);
        let md = "# Golden\n\nGolden **river** market.\n\nQuiet stone bridge at night.";
        assert_eq!(page_returned(Some(&answer(md)), text), Verdict::Pass);
        let canned = answer("Welcome to our site. Nothing to see here.");
        assert!(matches!(
            page_returned(Some(&canned), text),
            Verdict::Suspect(_)
        ));
        let shuffled = answer("night at bridge stone quiet market river golden");
        assert!(matches!(
            page_returned(Some(&shuffled), text),
            Verdict::Suspect(_)
        ));
        let failed = br#"{"results":[{"url":"u","success":false,"error":"refused"}]}"#;
        assert_eq!(page_returned(Some(failed), text), Verdict::Inconclusive);
        assert!(matches!(
            page_returned(Some(b"garbage"), text),
            Verdict::Suspect(_)
        ));
    }
}
