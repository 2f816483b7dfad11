//! A node's verification record: its score, streaks, and whether it is
//! quarantined.

use super::compare::Verdict;
use crate::types::Timestamp;
use crate::wire::{NodeVerification, VerificationStatus};

/// What verification knows about one node on this host.
#[derive(Clone, Debug, Default)]
pub(crate) struct Reputation {
    view: NodeVerification,
    pass_streak: u32,
    suspect_streak: u32,
}

/// What a verdict changed about routing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Change {
    None,
    Quarantined,
    Requalified,
}

impl Reputation {
    /// The record as providers and the admin see it.
    pub(crate) fn view(&self) -> &NodeVerification {
        &self.view
    }

    /// Whether it is out of routing for what canaries found.
    pub(crate) fn quarantined(&self) -> bool {
        self.view.status == VerificationStatus::Quarantined
    }

    /// Folds in a verdict given at `now`: a pass moves the score a quarter
    /// of the way to 1,000, a failure halves it. `quarantine_after` failures
    /// in a row quarantine the node; once quarantined, `requalify_after`
    /// passes in a row let it back.
    pub(crate) fn record(
        &mut self,
        verdict: &Verdict,
        now: Timestamp,
        quarantine_after: u32,
        requalify_after: u32,
    ) -> Change {
        let v = &mut self.view;
        match verdict {
            Verdict::Inconclusive => return Change::None,
            Verdict::Pass => {
                v.passed += 1;
                v.score_permille += (1000 - v.score_permille).div_ceil(4);
                self.pass_streak += 1;
                self.suspect_streak = 0;
            }
            Verdict::Suspect(why) => {
                v.failed += 1;
                v.score_permille /= 2;
                self.suspect_streak += 1;
                self.pass_streak = 0;
                v.reason = Some(why.clone());
            }
        }
        v.checked_at = Some(now);
        let was = v.status == VerificationStatus::Quarantined;
        v.status = match (was, verdict) {
            (false, Verdict::Suspect(_)) if self.suspect_streak >= quarantine_after.max(1) => {
                VerificationStatus::Quarantined
            }
            (false, Verdict::Suspect(_)) => VerificationStatus::Suspect,
            (true, Verdict::Pass) if self.pass_streak >= requalify_after.max(1) => {
                v.reason = None;
                VerificationStatus::Verified
            }
            (true, _) => VerificationStatus::Quarantined,
            (false, _) => VerificationStatus::Verified,
        };
        match (was, v.status == VerificationStatus::Quarantined) {
            (false, true) => Change::Quarantined,
            (true, false) => Change::Requalified,
            _ => Change::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_in_a_row_quarantine_and_passes_in_a_row_requalify() {
        let mut r = Reputation::default();
        let t = Timestamp(1);
        let bad = Verdict::Suspect("wrong".into());
        assert_eq!(r.record(&Verdict::Pass, t, 2, 3), Change::None);
        assert_eq!(r.record(&bad, t, 2, 3), Change::None);
        assert_eq!(r.view().status, VerificationStatus::Suspect);
        // A pass in between resets the streak.
        r.record(&Verdict::Pass, t, 2, 3);
        r.record(&bad, t, 2, 3);
        assert_eq!(r.record(&bad, t, 2, 3), Change::Quarantined);
        assert!(r.quarantined());
        assert_eq!(r.record(&Verdict::Inconclusive, t, 2, 3), Change::None);
        r.record(&Verdict::Pass, t, 2, 3);
        r.record(&Verdict::Pass, t, 2, 3);
        assert!(r.quarantined(), "two passes are not enough");
        assert_eq!(r.record(&Verdict::Pass, t, 2, 3), Change::Requalified);
        assert_eq!(r.view().reason, None);
        assert_eq!((r.view().passed, r.view().failed), (5, 3));
        assert!(r.view().score_permille < 1000);
    }
}
