//! When each shown status goes stale, so that the sweep looks only at the clusters whose time
//! came rather than at every cluster each second (10,000 of them held reads for 3 ms).

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use crate::domain::ClusterId;

/// The instant each fresh cluster goes stale unless a check comes first, in time order.
#[derive(Debug, Default)]
pub(super) struct StaleDeadlines {
    by_time: BTreeSet<(Instant, ClusterId)>,
    of: HashMap<ClusterId, Instant>,
}

impl StaleDeadlines {
    /// `id` goes stale at `at`, unless set again before.
    pub(super) fn set(&mut self, id: ClusterId, at: Instant) {
        match self.of.insert(id, at) {
            Some(old) if old == at => return,
            Some(old) => {
                self.by_time.remove(&(old, id));
            }
            None => {}
        }
        self.by_time.insert((at, id));
    }

    /// `id` has no deadline: it is stale already, unchecked, or gone.
    pub(super) fn forget(&mut self, id: ClusterId) {
        if let Some(old) = self.of.remove(&id) {
            self.by_time.remove(&(old, id));
        }
    }

    /// The clusters whose deadline is `now` or earlier, forgotten.
    pub(super) fn take_due(&mut self, now: Instant) -> Vec<ClusterId> {
        let mut due = Vec::new();
        while let Some(&(at, id)) = self.by_time.first() {
            if at > now {
                break;
            }
            self.by_time.pop_first();
            self.of.remove(&id);
            due.push(id);
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn only_clusters_whose_deadline_passed_are_due_and_a_later_deadline_replaces_an_earlier() {
        let start = Instant::now();
        let (a, b, c) = (
            ClusterId::from_u128(1),
            ClusterId::from_u128(2),
            ClusterId::from_u128(3),
        );
        let mut deadlines = StaleDeadlines::default();
        deadlines.set(a, start + Duration::from_secs(1));
        deadlines.set(b, start + Duration::from_secs(2));
        deadlines.set(c, start + Duration::from_secs(1));
        // A check moved b's deadline; c was deleted.
        deadlines.set(b, start + Duration::from_secs(5));
        deadlines.forget(c);
        assert!(deadlines.take_due(start).is_empty());
        assert_eq!(deadlines.take_due(start + Duration::from_secs(3)), vec![a]);
        assert!(
            deadlines
                .take_due(start + Duration::from_secs(4))
                .is_empty()
        );
        assert_eq!(deadlines.take_due(start + Duration::from_secs(5)), vec![b]);
        assert!(deadlines.of.is_empty() && deadlines.by_time.is_empty());
    }
}
