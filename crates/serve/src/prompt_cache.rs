//! Prompts already read, kept so that a new prompt that starts the same way reads only the rest
//! (automatic prefix caching, as llama.cpp's server and vLLM do). Chat requests share their
//! template and system prompt, often half of a short prompt's tokens.
//!
//! An entry holds the keys and values of one prompt's positions under one routing: a prompt
//! run under other experts has other keys in the expert layers. Routings that choose experts
//! per token (top-k, a threshold) are never cached: an expert's cache skips the positions it
//! did not run on, so a prefix of it is not the prefix of the sequence. The cache is emptied
//! whenever the model's experts change.

use std::collections::VecDeque;

use mode_core::Routing;
use mode_model::KvCache;

/// One prompt's keys and values.
struct Entry {
    routing: Routing,
    ids: Vec<u32>,
    cache: KvCache,
}

/// Prompts read recently, the least recently used first, within a memory budget.
pub(crate) struct PromptCache {
    entries: VecDeque<Entry>,
    budget_bytes: u64,
    /// The model generation the entries were computed under.
    generation: u64,
}

impl PromptCache {
    /// A cache of at most `budget_bytes` of keys and values (0 keeps nothing).
    pub fn new(budget_bytes: u64) -> Self {
        Self {
            entries: VecDeque::new(),
            budget_bytes,
            generation: 0,
        }
    }

    /// Forgets every entry when the model has changed since they were computed.
    pub fn sync(&mut self, generation: u64) {
        if generation != self.generation {
            self.entries.clear();
            self.generation = generation;
        }
    }

    /// The longest cached start of `ids` under `routing`, leaving at least the last token to
    /// read (its logits give the first new token): a cache holding that many positions, with
    /// room for `capacity`, and how many. `None` when nothing useful is cached.
    pub fn lookup(
        &mut self,
        routing: &Routing,
        ids: &[u32],
        capacity: usize,
    ) -> mode_model::Result<Option<(KvCache, usize)>> {
        if !cacheable(routing) || ids.len() < 2 {
            return Ok(None);
        }
        let best = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| &e.routing == routing)
            .map(|(i, e)| (i, common_prefix(&e.ids, ids).min(ids.len() - 1)))
            .max_by_key(|&(_, n)| n);
        let Some((i, n)) = best.filter(|&(_, n)| n > 0) else {
            return Ok(None);
        };
        let entry = self.entries.remove(i).expect("found above");
        let cache = entry.cache.copy_prefix(n, capacity)?;
        self.entries.push_back(entry);
        Ok(Some((cache, n)))
    }

    /// Keeps the first `ids.len()` positions of `cache`, the keys and values of prompt `ids`
    /// under `routing`, each position taking `bytes_per_token`. An entry that `ids` extends is
    /// dropped; nothing is kept when an entry already covers `ids`.
    pub fn insert(
        &mut self,
        routing: &Routing,
        ids: &[u32],
        cache: &KvCache,
        bytes_per_token: u64,
    ) -> mode_model::Result<()> {
        let bytes = ids.len() as u64 * bytes_per_token;
        if !cacheable(routing) || ids.is_empty() || bytes > self.budget_bytes {
            return Ok(());
        }
        let same = |e: &Entry| &e.routing == routing;
        if self
            .entries
            .iter()
            .any(|e| same(e) && e.ids.starts_with(ids))
        {
            return Ok(());
        }
        self.entries
            .retain(|e| !(same(e) && ids.starts_with(&e.ids)));
        self.entries.push_back(Entry {
            routing: routing.clone(),
            ids: ids.to_vec(),
            cache: cache.copy_prefix(ids.len(), ids.len())?,
        });
        let mut used: u64 = self
            .entries
            .iter()
            .map(|e| e.ids.len() as u64 * bytes_per_token)
            .sum();
        while used > self.budget_bytes {
            let old = self
                .entries
                .pop_front()
                .expect("over budget means not empty");
            used -= old.ids.len() as u64 * bytes_per_token;
        }
        Ok(())
    }
}

/// Whether a prompt's keys and values under `routing` are a function of its tokens alone.
fn cacheable(routing: &Routing) -> bool {
    routing.top_k.is_none() && routing.threshold.is_none_or(|t| t <= 0.0)
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};
    use mode_model::{Architecture, Backbone, CausalLm, Config};

    fn filled(bb: &Backbone, ids: &[u32]) -> KvCache {
        let mut cache = KvCache::new(bb.layers.len());
        let t = Tensor::new(ids, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        bb.hidden_states(&t, Some(&mut cache)).unwrap();
        cache
    }

    fn backbone() -> Backbone {
        let config = Config::tiny(Architecture::Llama);
        Backbone::random(config, 1, DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn finds_the_longest_start_under_the_same_routing_and_forgets_on_change() {
        let bb = backbone();
        let dense = Routing::default();
        let alone = Routing {
            experts: Some(vec![]),
            ..Routing::default()
        };
        let top1 = Routing {
            top_k: Some(1),
            ..Routing::default()
        };
        let mut pc = PromptCache::new(1 << 30);
        pc.sync(1);
        let a = [1, 2, 3, 4, 5];
        pc.insert(&dense, &a, &filled(&bb, &a), 10).unwrap();
        pc.insert(&top1, &a, &filled(&bb, &a), 10).unwrap();
        let b = [1, 2, 3, 9, 9, 9];
        let (cache, n) = pc.lookup(&dense, &b, 16).unwrap().unwrap();
        assert_eq!((n, cache.len()), (3, 3));
        // The copied positions hold what reading them afresh gives.
        let fresh = filled(&bb, &b[..3]);
        for (got, want) in cache.layers.iter().zip(&fresh.layers) {
            let (g, w) = (got.keys_values().unwrap(), want.keys_values().unwrap());
            let diff = (g.0 - w.0).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        }
        // The whole prompt cached still leaves its last token to read.
        assert_eq!(pc.lookup(&dense, &a, 16).unwrap().unwrap().1, 4);
        assert!(
            pc.lookup(&alone, &b, 16).unwrap().is_none(),
            "other routing"
        );
        assert!(
            pc.lookup(&top1, &b, 16).unwrap().is_none(),
            "per-token routing"
        );
        assert!(pc.lookup(&dense, &[7, 1, 2], 16).unwrap().is_none());
        pc.sync(2);
        assert!(
            pc.lookup(&dense, &b, 16).unwrap().is_none(),
            "model changed"
        );
    }

    #[test]
    fn keeps_within_its_budget_dropping_the_least_recently_used() {
        let bb = backbone();
        let dense = Routing::default();
        let mut pc = PromptCache::new(100);
        let (a, b, c) = ([1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]);
        pc.insert(&dense, &a, &filled(&bb, &a), 10).unwrap();
        pc.insert(&dense, &b, &filled(&bb, &b), 10).unwrap();
        assert!(pc.lookup(&dense, &[1, 2, 0], 8).unwrap().is_some()); // a is now the newest
        pc.insert(&dense, &c, &filled(&bb, &c), 10).unwrap();
        assert!(
            pc.lookup(&dense, &[5, 6, 0], 8).unwrap().is_none(),
            "b was dropped"
        );
        assert!(pc.lookup(&dense, &[1, 2, 0], 8).unwrap().is_some());
        // A prompt extending a cached one replaces it.
        let a_longer = [1, 2, 3, 4, 5, 6];
        pc.insert(&dense, &a_longer, &filled(&bb, &a_longer), 10)
            .unwrap();
        assert_eq!(pc.entries.len(), 2);
        assert_eq!(
            pc.lookup(&dense, &[1, 2, 3, 4, 5, 0], 8)
                .unwrap()
                .unwrap()
                .1,
            5
        );
        // Too large for the budget: not kept.
        let mut small = PromptCache::new(10);
        small.insert(&dense, &a, &filled(&bb, &a), 10).unwrap();
        assert!(small.entries.is_empty());
    }
}
