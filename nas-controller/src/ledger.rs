//! Id bookkeeping shared by every strategy: ids are handed out in increasing order from 0,
//! so an id below `next_id` that is not pending has been reported already.

use serde::{Deserialize, Serialize};

use crate::{ControllerError, Proposal};

/// The proposals a strategy has handed out and not yet seen reported.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Ledger {
    /// The id the next proposal gets.
    pub(crate) next_id: u64,
    /// Handed out, not yet reported, in id order.
    pub(crate) pending: Vec<Proposal>,
}

impl Ledger {
    /// Hands out a new proposal with the next id, and keeps a copy as pending.
    pub(crate) fn issue(&mut self, mut proposal: Proposal) -> Proposal {
        proposal.id = self.next_id;
        self.next_id += 1;
        self.pending.push(proposal.clone());
        proposal
    }

    /// Takes `id` off the pending list. Unknown ids, ids already reported and non-finite
    /// rewards are errors that leave the ledger unchanged.
    pub(crate) fn take(&mut self, id: u64, reward: Option<f64>) -> Result<Proposal, ControllerError> {
        if id >= self.next_id {
            return Err(ControllerError::UnknownProposal { id, next_id: self.next_id });
        }
        let Ok(pos) = self.pending.binary_search_by_key(&id, |p| p.id) else {
            return Err(ControllerError::DuplicateReport { id });
        };
        if let Some(r) = reward.filter(|r| !r.is_finite()) {
            return Err(ControllerError::InvalidReward { id, reward: r });
        }
        Ok(self.pending.remove(pos))
    }
}
