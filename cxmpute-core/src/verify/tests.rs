//! The measurement behind the default tolerance, on the testkit's stand-in
//! models (deterministic functions of the input, with the relative noise
//! honest hardware adds).

#[cfg(feature = "testkit")]
#[test]
fn the_default_tolerance_separates_hardware_noise_from_another_model() {
    use super::compare::cosine;
    use super::DEFAULT_MIN_COSINE;
    use crate::testkit::models_for_tests::AnswerState;
    use crate::testkit::{model_embedding, Answers};

    let texts: Vec<String> = (0..1000)
        .map(|i| format!("canary text number {i}"))
        .collect();
    // Two honest nodes with independent noise, relative per component.
    let mut worst = Vec::new();
    for noise in [0.01, 0.05, 0.10, 0.20, 0.30] {
        let (mut a, mut b) = (AnswerState::default(), AnswerState::default());
        let model = |s| Answers::Model {
            seed: 1,
            noise,
            noise_seed: s,
        };
        a.set(model(1));
        b.set(model(2));
        let min = (texts.iter())
            .map(|t| cosine(&a.embedding(t).unwrap(), &b.embedding(t).unwrap()))
            .fold(1.0f64, f64::min);
        worst.push((noise, min));
    }
    // Another model's vectors for the same texts.
    let other = (texts.iter())
        .map(|t| cosine(&model_embedding(1, t), &model_embedding(2, t)).abs())
        .fold(0.0f64, f64::max);
    eprintln!("least cosine between honest nodes by relative noise: {worst:?}");
    eprintln!("greatest |cosine| against another model: {other:.3}");
    // Noise up to 10 % per component stays well inside the tolerance...
    for (noise, min) in &worst {
        if *noise <= 0.10 {
            assert!(*min > DEFAULT_MIN_COSINE + 0.01, "{noise}: {min}");
        }
    }
    // ...30 % does not (the tolerance is not so loose that anything passes)...
    assert!(worst[4].1 < DEFAULT_MIN_COSINE, "{worst:?}");
    // ...and another model is nowhere near.
    assert!(other < 0.3, "{other}");
}

#[test]
fn settings_that_would_judge_nothing_or_everything_are_refused() {
    use super::VerifyConfig;
    assert!(VerifyConfig::default().check().is_ok());
    let refused = |f: &dyn Fn(&mut VerifyConfig)| {
        let mut c = VerifyConfig::default();
        f(&mut c);
        c.check().is_err()
    };
    assert!(refused(&|c| c.min_cosine = f64::NAN));
    assert!(refused(&|c| c.min_cosine = 1.5));
    assert!(refused(&|c| c.chat_prefix_tokens = 0));
    assert!(refused(&|c| c.speech_chars_per_second = (10.0, 5.0)));
    assert!(refused(&|c| c.page_base = Some("not a url".into())));
    assert!(refused(&|c| c.quarantine_after = 0));
}
