//! Summing settled requests into usage rows (the in-memory store's GROUP BY).

use crate::model::{utc_day, GroupBy, Reservation, TokenUsage, UsageRow};
use std::collections::BTreeMap;
use tokenfab_types::NanoUsd;

#[derive(Default)]
pub(crate) struct Summer {
    groups: BTreeMap<String, UsageRow>,
}

impl Summer {
    pub(crate) fn add(&mut self, by: GroupBy, r: &Reservation, u: TokenUsage, cost: NanoUsd) {
        let group = match by {
            GroupBy::Model => r.model.clone(),
            GroupBy::Day => utc_day(r.now),
            GroupBy::Key => r.key_id.clone(),
            GroupBy::Tenant => r.tenant.0.clone(),
        };
        let row = self.groups.entry(group.clone()).or_insert(UsageRow {
            group,
            requests: 0,
            prompt_tokens: 0,
            cached_tokens: 0,
            completion_tokens: 0,
            cost_nano_usd: 0,
        });
        row.requests += 1;
        row.prompt_tokens += u.prompt.0;
        row.cached_tokens += u.cached.0;
        row.completion_tokens += u.completion.0;
        row.cost_nano_usd += cost.0;
    }

    pub(crate) fn rows(self) -> Vec<UsageRow> {
        self.groups.into_values().collect()
    }
}
