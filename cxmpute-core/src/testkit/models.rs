//! What a stand-in node's answers are made of: fixed texts, or a small
//! deterministic "model" (a function of the input and a seed) with optional
//! numeric noise, so tests can have honest nodes that agree, honest nodes
//! that differ as real hardware does, and nodes that lie.

use rand::{Rng, SeedableRng};

/// The width of a stand-in model's embeddings.
pub const EMBEDDING_DIM: usize = 384;

/// The words a stand-in model's chat answers are made of.
const VOCABULARY: &[&str] = &[
    "the", "a", "river", "runs", "quietly", "through", "old", "town", "under", "bright", "sky",
    "people", "gather", "near", "market", "for", "morning", "bread", "and", "coffee", "while",
    "children", "play", "by", "stone", "bridge", "that", "leads", "to", "green", "hills", "far",
];

/// How many tokens of a stand-in model's chat answer noise never changes
/// (what temperature 0 with one seed keeps alike on honest hardware); the
/// rest may drift.
pub const STABLE_TOKENS: usize = 12;

/// What a stand-in answers with.
#[derive(Clone, Debug, PartialEq)]
pub enum Answers {
    /// The fixed answers: `Hello from <name>`, and a 4-wide vector by index.
    Fixed,
    /// The model `seed`: chat text and embeddings are functions of the input
    /// and the seed, so nodes with one seed agree. With `noise` above 0
    /// each embedding component is scaled by `1 + e`, `e` uniform in
    /// `±noise`, and the chat answer's tokens after [`STABLE_TOKENS`] may
    /// change; drawn from a generator seeded with `noise_seed`.
    Model {
        /// The model.
        seed: u64,
        /// The relative noise on each embedding component.
        noise: f64,
        /// The noise generator's seed.
        noise_seed: u64,
    },
    /// The same text whatever the prompt, and a constant vector; speech
    /// of half a second whatever the text.
    Canned(String),
    /// Honest answers but speech cut to a fifth of its length (with a
    /// header that says so, as a careful liar would write it).
    TruncatedAudio,
}

/// The sample rate of a stand-in's speech.
pub const SPEECH_RATE: u32 = 24_000;

/// How fast a stand-in speaks, in characters a second (espeak's 175 words
/// a minute).
pub const SPEECH_CHARS_PER_SECOND: f64 = 14.5;

/// A 16-bit mono PCM WAV of `samples` samples of a quiet tone at `rate`.
pub fn wav(rate: u32, samples: usize) -> Vec<u8> {
    let data = (samples * 2) as u32;
    let mut w = Vec::with_capacity(44 + samples * 2);
    w.extend_from_slice(b"RIFF");
    w.extend_from_slice(&(36 + data).to_le_bytes());
    w.extend_from_slice(b"WAVEfmt ");
    w.extend_from_slice(&16u32.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes());
    w.extend_from_slice(&rate.to_le_bytes());
    w.extend_from_slice(&(rate * 2).to_le_bytes());
    w.extend_from_slice(&2u16.to_le_bytes());
    w.extend_from_slice(&16u16.to_le_bytes());
    w.extend_from_slice(b"data");
    w.extend_from_slice(&data.to_le_bytes());
    for i in 0..samples {
        let v = ((i as f64 * 0.05).sin() * 2_000.0) as i16;
        w.extend_from_slice(&v.to_le_bytes());
    }
    w
}

impl Answers {
    /// The model `seed`, without noise.
    pub fn model(seed: u64) -> Self {
        Answers::Model {
            seed,
            noise: 0.0,
            noise_seed: 0,
        }
    }
}

/// A well-mixed 64-bit hash step (splitmix64's finaliser).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn hash_text(seed: u64, text: &str) -> u64 {
    text.bytes().fold(mix(seed), |h, b| mix(h ^ u64::from(b)))
}

/// The embedding of `text` by the stand-in model `seed`: [`EMBEDDING_DIM`]
/// components in `[-1, 1)`.
pub fn model_embedding(seed: u64, text: &str) -> Vec<f64> {
    let h = hash_text(seed, text);
    (0..EMBEDDING_DIM as u64)
        .map(|k| {
            (mix(h ^ k.wrapping_mul(0x2545_f491_4f6c_dd1d)) >> 11) as f64 / (1u64 << 52) as f64
                - 1.0
        })
        .collect()
}

/// The chat answer to `prompt` by the stand-in model `seed`: 20 words.
pub fn model_chat(seed: u64, prompt: &str) -> String {
    let h = hash_text(seed, prompt);
    (0..20u64)
        .map(|k| VOCABULARY[(mix(h ^ k) % VOCABULARY.len() as u64) as usize])
        .collect::<Vec<_>>()
        .join(" ")
}

/// A node's answers with its noise generator.
pub(crate) struct AnswerState {
    /// What they are made of.
    pub(crate) answers: Answers,
    rng: rand::rngs::StdRng,
}

impl Default for AnswerState {
    fn default() -> Self {
        AnswerState {
            answers: Answers::Fixed,
            rng: rand::rngs::StdRng::seed_from_u64(0),
        }
    }
}

impl AnswerState {
    pub(crate) fn set(&mut self, answers: Answers) {
        if let Answers::Model { noise_seed, .. } = answers {
            self.rng = rand::rngs::StdRng::seed_from_u64(noise_seed);
        }
        self.answers = answers;
    }

    /// The chat answer to `prompt` (`None`: the fixed answer).
    pub(crate) fn chat(&mut self, prompt: &str) -> Option<String> {
        match &self.answers {
            Answers::Fixed | Answers::TruncatedAudio => None,
            Answers::Canned(t) => Some(t.clone()),
            Answers::Model { seed, noise, .. } => {
                let text = model_chat(*seed, prompt);
                if *noise <= 0.0 {
                    return Some(text);
                }
                // Past the stable tokens, half the time, another ending.
                let mut words: Vec<String> = text.split(' ').map(str::to_owned).collect();
                for w in words.iter_mut().skip(STABLE_TOKENS) {
                    if self.rng.random_bool(0.5) {
                        *w = VOCABULARY[self.rng.random_range(0..VOCABULARY.len())].to_owned();
                    }
                }
                Some(words.join(" "))
            }
        }
    }

    /// Speech for `text`: a WAV as long as speaking it takes.
    pub(crate) fn speech(&self, text: &str) -> Vec<u8> {
        let secs = text.chars().count() as f64 / SPEECH_CHARS_PER_SECOND;
        let secs = match self.answers {
            Answers::TruncatedAudio => secs / 5.0,
            Answers::Canned(_) => 0.5,
            _ => secs,
        };
        wav(SPEECH_RATE, (secs * f64::from(SPEECH_RATE)) as usize)
    }

    /// The embedding of `text` (`None`: the fixed answer).
    pub(crate) fn embedding(&mut self, text: &str) -> Option<Vec<f64>> {
        match &self.answers {
            Answers::Fixed | Answers::TruncatedAudio => None,
            Answers::Canned(_) => Some(vec![0.5; EMBEDDING_DIM]),
            Answers::Model { seed, noise, .. } => {
                let (seed, noise) = (*seed, *noise);
                let mut v = model_embedding(seed, text);
                if noise > 0.0 {
                    for x in &mut v {
                        *x *= 1.0 + self.rng.random_range(-noise..noise);
                    }
                }
                Some(v)
            }
        }
    }
}
