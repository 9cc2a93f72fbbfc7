//! Fair load shedding per tenant on a listener that serves several tenants
//! (an authenticated ingress: the tenant comes from each caller's
//! credentials). The listener's in-flight budget is shared so that one
//! tenant's flood cannot make another tenant's requests shed:
//!
//! - while other tenants have requests in flight, a tenant may hold at
//!   most `budget / active tenants` (its fair share);
//! - a tenant alone may use the budget but for a reserve (`budget / 8`,
//!   at least one), kept for a tenant that arrives during its flood; once
//!   the newcomer is in flight the first tenant's share drops to half and
//!   its new requests are shed until it is under it.
//!
//! A plain listener serves one tenant (from its configuration), so its own
//! in-flight budget already isolates it from the others' listeners; it
//! does not need this. Pure: counts in, decisions out.

use std::collections::HashMap;

/// In-flight requests per tenant under one listener's budget.
#[derive(Debug)]
pub struct FairShare {
    budget: usize,
    in_flight: HashMap<String, usize>,
    total: usize,
}

impl FairShare {
    pub fn new(budget: usize) -> FairShare {
        FairShare {
            budget: budget.max(1),
            in_flight: HashMap::new(),
            total: 0,
        }
    }

    /// The most `tenant` may hold now.
    pub fn allowance(&self, tenant: &str) -> usize {
        let others = self
            .in_flight
            .iter()
            .filter(|(t, n)| **n > 0 && t.as_str() != tenant)
            .count();
        if others == 0 {
            let reserve = (self.budget / 8).max(1);
            self.budget.saturating_sub(reserve).max(1)
        } else {
            (self.budget / (others + 1)).max(1)
        }
    }

    /// One more request of `tenant`, if within its allowance and the budget.
    pub fn try_admit(&mut self, tenant: &str) -> bool {
        let mine = self.in_flight.get(tenant).copied().unwrap_or(0);
        if self.total >= self.budget || mine >= self.allowance(tenant) {
            return false;
        }
        *self.in_flight.entry(tenant.to_string()).or_insert(0) += 1;
        self.total += 1;
        true
    }

    /// A request of `tenant` is done.
    pub fn release(&mut self, tenant: &str) {
        if let Some(n) = self.in_flight.get_mut(tenant) {
            *n = n.saturating_sub(1);
            self.total = self.total.saturating_sub(1);
            if *n == 0 {
                self.in_flight.remove(tenant);
            }
        }
    }

    /// Requests in flight, all tenants.
    pub fn total(&self) -> usize {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flooding_tenant_leaves_room_for_another() {
        let mut f = FairShare::new(16);
        // Alone: all but the reserve of 2.
        for _ in 0..14 {
            assert!(f.try_admit("a"));
        }
        assert!(!f.try_admit("a"), "the reserve is for others");
        // B arrives: admitted from the reserve...
        assert!(f.try_admit("b"));
        // ...and A is now held to half: shed until it drains below 8.
        assert_eq!(f.allowance("a"), 8);
        assert!(!f.try_admit("a"));
        for _ in 0..6 {
            f.release("a");
        }
        assert!(!f.try_admit("a"), "8 in flight");
        f.release("a");
        assert!(f.try_admit("a"));
        // B may grow to its half.
        for _ in 0..7 {
            assert!(f.try_admit("b"));
        }
        assert!(!f.try_admit("b"));
        assert_eq!(f.total(), 16);
    }

    #[test]
    fn a_tenant_that_is_done_no_longer_counts() {
        let mut f = FairShare::new(8);
        assert!(f.try_admit("b"));
        assert_eq!(f.allowance("a"), 4);
        f.release("b");
        assert_eq!(f.allowance("a"), 7);
        // Releasing what was never admitted changes nothing.
        f.release("c");
        assert_eq!(f.total(), 0);
    }

    #[test]
    fn a_budget_of_one_still_admits() {
        let mut f = FairShare::new(1);
        assert!(f.try_admit("a"));
        assert!(!f.try_admit("b"));
    }
}
