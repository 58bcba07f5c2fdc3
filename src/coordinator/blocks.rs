//! The paged KV cache's allocator. Every worker holds the same pool of blocks (each block a
//! page of positions of the worker's own KV heads); the coordinator alone decides which block
//! holds which page of which sequence, and sends the block tables' changes with the steps.
//!
//! Blocks are shared by prefix, as vLLM's automatic prefix caching shares them: a block whose
//! positions are all written is registered under its tokens and its parent block (the block
//! before it in the sequence, and that block's generation, bumped whenever a block is reused for
//! other content), so a block is found only by walking a prompt's tokens from position 0. A
//! later prompt walking the same tokens shares the blocks (reference counted) and computes only
//! the rest. When a sequence finishes, its last, partly written block is registered as well; a
//! prompt that starts with part of a registered block may take it over if no sequence uses it,
//! which keeps a conversation continuing in the next request reusing every token. Blocks no
//! sequence uses stay registered until the pool needs them; the least recently used go first.

use std::collections::{BTreeSet, HashMap};

use crate::proto;

/// The block before a block in its sequence and that block's generation; `None` at position 0.
type Parent = Option<(u32, u32)>;

#[derive(Clone, Debug, Default)]
struct Block {
    /// Sequences whose tables hold the block.
    refs: u32,
    /// Bumped each time the block is taken for other content: children registered under an
    /// older generation are never found again.
    generation: u32,
    /// Registered under (parent, the tokens of its positions); at most a page of tokens.
    key: Option<(Parent, Vec<u32>)>,
    /// When a sequence last released it (for eviction).
    used: u64,
}

pub struct BlockPool {
    page: usize,
    blocks: Vec<Block>,
    /// Blocks nobody uses and nobody registered.
    unused: Vec<u32>,
    /// Registered blocks nobody uses, by (last use, block): evicted oldest first.
    evictable: BTreeSet<(u64, u32)>,
    /// Registered blocks by parent.
    children: HashMap<Parent, Vec<u32>>,
    /// Per sequence: its block per page.
    tables: Vec<Vec<u32>>,
    /// Per sequence: leading table entries registered (or shared from the registry).
    registered: Vec<usize>,
    /// Per sequence: the table the workers hold, as far as the coordinator knows.
    sent: Vec<Vec<u32>>,
    tick: u64,
    /// Share registered blocks with new prompts (off: `--no-prefix-cache`; blocks are still
    /// registered, so that a slot's last conversation can be saved).
    sharing: bool,
}

impl BlockPool {
    /// `blocks` blocks of `page` positions for `sequences` sequences.
    pub fn new(blocks: usize, page: usize, sequences: usize) -> BlockPool {
        BlockPool {
            page,
            blocks: vec![Block::default(); blocks],
            unused: (0..blocks as u32).rev().collect(),
            evictable: BTreeSet::new(),
            children: HashMap::new(),
            tables: vec![Vec::new(); sequences],
            registered: vec![0; sequences],
            sent: vec![Vec::new(); sequences],
            tick: 0,
            sharing: true,
        }
    }

    /// Turns prefix sharing with new prompts on or off (it starts on).
    pub fn set_sharing(&mut self, on: bool) {
        self.sharing = on;
    }

    pub fn page(&self) -> usize {
        self.page
    }

    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks a sequence could get now: unused, or registered and used by no sequence.
    pub fn available(&self) -> usize {
        self.unused.len() + self.evictable.len()
    }

    /// Blocks in a sequence's table.
    pub fn held(&self, sequence: usize) -> usize {
        self.tables[sequence].len()
    }

    /// Blocks a sequence needs beyond its table to hold positions `0..end`.
    pub fn needed(&self, sequence: usize, end: usize) -> usize {
        end.div_ceil(self.page).saturating_sub(self.held(sequence))
    }

    fn parent(&self, sequence: usize, index: usize) -> Parent {
        let b = *self.tables[sequence].get(index.checked_sub(1)?)?;
        Some((b, self.blocks[b as usize].generation))
    }

    /// Takes a block out of the registry (its content is about to change).
    fn unregister(&mut self, b: u32) {
        let block = &mut self.blocks[b as usize];
        if let Some((parent, _)) = block.key.take() {
            if block.refs == 0 {
                self.evictable.remove(&(block.used, b));
            }
            if let Some(list) = self.children.get_mut(&parent) {
                list.retain(|&c| c != b);
                if list.is_empty() {
                    self.children.remove(&parent);
                }
            }
        }
        self.blocks[b as usize].generation = self.blocks[b as usize].generation.wrapping_add(1);
    }

    /// A block for new content: an unused one, else the least recently used registered one.
    fn allocate(&mut self) -> Option<u32> {
        let b = match self.unused.pop() {
            Some(b) => b,
            None => self.evictable.first().map(|&(_, b)| b)?,
        };
        self.unregister(b);
        self.blocks[b as usize].refs = 1;
        Some(b)
    }

    fn share(&mut self, b: u32) {
        let block = &mut self.blocks[b as usize];
        if block.refs == 0 {
            self.evictable.remove(&(block.used, b));
        }
        block.refs += 1;
    }

    fn drop_ref(&mut self, b: u32) {
        self.tick += 1;
        let block = &mut self.blocks[b as usize];
        block.refs -= 1;
        block.used = self.tick;
        if block.refs == 0 {
            if block.key.is_some() {
                self.evictable.insert((block.used, b));
            } else {
                self.unused.push(b);
            }
        }
    }

    /// Starts a sequence (its table empty) on `tokens`: shares the registered blocks its
    /// tokens walk through, and takes over a registered block it matches in part if no
    /// sequence uses it. Returns how many tokens the sequence's blocks already hold: at most
    /// `limit`.
    pub fn attach(&mut self, sequence: usize, tokens: &[u32], limit: usize) -> usize {
        if !self.sharing {
            return 0;
        }
        self.find(sequence, tokens, limit)
    }

    /// As [`BlockPool::attach`] whether or not sharing is on: finds a sequence's blocks to save
    /// them.
    pub fn find(&mut self, sequence: usize, tokens: &[u32], limit: usize) -> usize {
        assert!(
            self.tables[sequence].is_empty(),
            "sequence {sequence} holds blocks"
        );
        let limit = limit.min(tokens.len());
        let page = self.page;
        let mut position = 0;
        while position < limit {
            let parent = self.parent(sequence, self.tables[sequence].len());
            let segment = &tokens[position..(position + page).min(tokens.len())];
            let best = self.children.get(&parent).and_then(|list| {
                list.iter()
                    .map(|&b| {
                        let held = &self.blocks[b as usize].key.as_ref().expect("registered").1;
                        let common = held.iter().zip(segment).take_while(|(a, b)| a == b).count();
                        (common, held.len(), b)
                    })
                    .max_by_key(|&(common, _, b)| (common, std::cmp::Reverse(b)))
            });
            let Some((common, held, b)) = best.filter(|&(common, ..)| common > 0) else {
                break;
            };
            if common == page && held == page && position + page <= limit {
                self.share(b);
                self.tables[sequence].push(b);
                self.registered[sequence] += 1;
                position += page;
                continue;
            }
            // A block matched in part, or whose last position runs again: it will be written,
            // so it is taken only if no sequence uses it, and leaves the registry.
            if self.blocks[b as usize].refs == 0 {
                self.unregister(b);
                self.blocks[b as usize].refs = 1;
                self.tables[sequence].push(b);
                position = (position + common).min(limit);
            }
            break;
        }
        position
    }

    /// Gives a sequence blocks for positions `0..end`; false (and nothing taken) when the
    /// pool has too few.
    pub fn reserve(&mut self, sequence: usize, end: usize) -> bool {
        let needed = self.needed(sequence, end);
        if needed > self.available() {
            return false;
        }
        for _ in 0..needed {
            let b = self.allocate().expect("counted as available");
            self.tables[sequence].push(b);
        }
        true
    }

    /// Registers the sequence's blocks whose positions `tokens` fill completely (the tokens of
    /// positions `0..tokens.len()`, all written or being written by steps already sent).
    pub fn register_full(&mut self, sequence: usize, tokens: &[u32]) {
        let page = self.page;
        while self.registered[sequence] < self.tables[sequence].len()
            && (self.registered[sequence] + 1) * page <= tokens.len()
        {
            let i = self.registered[sequence];
            self.register(sequence, i, &tokens[i * page..(i + 1) * page]);
            self.registered[sequence] += 1;
        }
    }

    /// Registers table entry `i` of a sequence under `tokens`, unless an equal block is
    /// registered already (it stays private and is freed when released).
    fn register(&mut self, sequence: usize, i: usize, tokens: &[u32]) {
        let b = self.tables[sequence][i];
        if self.blocks[b as usize].key.is_some() {
            return;
        }
        let parent = self.parent(sequence, i);
        let list = self.children.entry(parent).or_default();
        let blocks = &self.blocks;
        let twin = list.iter().any(|&c| {
            blocks[c as usize]
                .key
                .as_ref()
                .is_some_and(|k| k.1 == tokens)
        });
        if !twin {
            list.push(b);
            self.blocks[b as usize].key = Some((parent, tokens.to_vec()));
        }
    }

    /// Ends a sequence whose positions `0..tokens.len()` hold `tokens`: registers its blocks
    /// (the last, partly written one too) and drops its references.
    pub fn release(&mut self, sequence: usize, tokens: &[u32]) {
        self.register_full(sequence, tokens);
        let (i, page) = (tokens.len() / self.page, self.page);
        if !tokens.len().is_multiple_of(page) && i < self.tables[sequence].len() {
            self.register(sequence, i, &tokens[i * page..]);
        }
        for b in std::mem::take(&mut self.tables[sequence]) {
            self.drop_ref(b);
        }
        self.registered[sequence] = 0;
    }

    /// Forgets every block (the workers' caches are gone, or their tables unknown).
    pub fn forget_all(&mut self) {
        let (blocks, page, sequences, sharing) = (
            self.blocks.len(),
            self.page,
            self.tables.len(),
            self.sharing,
        );
        let generations: Vec<u32> = self.blocks.iter().map(|b| b.generation + 1).collect();
        *self = BlockPool::new(blocks, page, sequences);
        self.sharing = sharing;
        for (b, g) in self.blocks.iter_mut().zip(generations) {
            b.generation = g;
        }
    }

    /// A sequence's table.
    pub fn table(&self, sequence: usize) -> &[u32] {
        &self.tables[sequence]
    }

    /// Records that the workers hold a sequence's table as it is now (sent outside a step),
    /// or, with `known` false, that what they hold is unknown (the next step sends it whole).
    pub fn mark_sent(&mut self, sequence: usize, known: bool) {
        self.sent[sequence] = if known {
            self.tables[sequence].clone()
        } else {
            Vec::new()
        };
    }

    /// The changes of the tables of `sequences` since they were last sent, to send with a step.
    pub fn updates(&mut self, sequences: &[u32]) -> Vec<proto::BlockTable> {
        let mut distinct = sequences.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        let mut out: Vec<proto::BlockTable> = Vec::new();
        for s in distinct {
            let s = s as usize;
            if self.sent[s] == self.tables[s] {
                continue;
            }
            let (sent, table) = (&self.sent[s], &self.tables[s]);
            let first = sent.iter().zip(table).take_while(|(a, b)| a == b).count();
            out.push(proto::BlockTable {
                sequence: s as u32,
                first: first as u32,
                blocks: table[first..].to_vec(),
            });
            self.sent[s] = table.clone();
        }
        out
    }

    /// Every sequence's table is either empty or held, no block is lost, and reference counts
    /// match the tables (for tests).
    #[cfg(test)]
    fn check(&self) {
        let mut refs = vec![0u32; self.blocks.len()];
        for t in &self.tables {
            for &b in t {
                refs[b as usize] += 1;
            }
        }
        for (b, block) in self.blocks.iter().enumerate() {
            assert_eq!(block.refs, refs[b], "block {b}");
        }
        let free = self.unused.len() + self.evictable.len();
        let used = refs.iter().filter(|&&r| r > 0).count();
        assert_eq!(free + used, self.blocks.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_prefix_is_stored_once_and_a_conversation_reuses_every_token() {
        let mut pool = BlockPool::new(8, 4, 3);
        // Sequence 0 runs 10 tokens: three blocks, the third partly written.
        let system: Vec<u32> = (100..110).collect();
        assert_eq!(pool.attach(0, &system, 9), 0);
        assert!(pool.reserve(0, 10));
        pool.register_full(0, &system);
        assert_eq!(pool.held(0), 3);
        // While it runs, sequence 1 with the same first 9 tokens shares the two full blocks.
        let mut other = system[..9].to_vec();
        other.extend([7, 7, 7]);
        assert_eq!(pool.attach(1, &other, other.len() - 1), 8);
        assert_eq!(pool.table(1), &pool.table(0)[..2]);
        assert!(pool.reserve(1, other.len()));
        assert_eq!(pool.available(), 8 - 4);
        pool.check();
        // Sequence 0 ends with a reply; the next turn resends it all and reuses every token of
        // it, taking over the partly written block.
        let mut history = system.clone();
        history.push(1);
        pool.release(0, &history);
        let mut next = history.clone();
        next.extend([3, 4, 5]);
        assert_eq!(pool.attach(2, &next, next.len() - 1), history.len());
        assert!(pool.reserve(2, next.len()));
        pool.check();
        // A prompt equal to a whole registered run keeps its last token to run again.
        pool.release(2, &next[..12]);
        assert_eq!(pool.attach(2, &next[..12], 11), 11);
        pool.release(2, &next[..12]);
        pool.release(1, &other);
        pool.check();
        assert_eq!(pool.available(), 8);
    }

    #[test]
    fn the_least_recently_used_blocks_are_evicted_and_their_children_forgotten() {
        let mut pool = BlockPool::new(4, 2, 2);
        let a: Vec<u32> = vec![1, 2, 3, 4];
        let b: Vec<u32> = vec![5, 6, 7, 8];
        for (tokens, sequence) in [(&a, 0), (&b, 1)] {
            assert_eq!(pool.attach(sequence, tokens, 3), 0);
            assert!(pool.reserve(sequence, 4));
            pool.release(sequence, tokens);
        }
        assert_eq!(pool.available(), 4);
        // A third prompt needs two blocks: a's (released first) are evicted.
        let c: Vec<u32> = vec![9, 9, 9, 9];
        assert_eq!(pool.attach(0, &c, 3), 0);
        assert!(pool.reserve(0, 4));
        pool.release(0, &c);
        assert_eq!(pool.attach(0, &a, 3), 0, "a's blocks were evicted");
        pool.release(0, &[]);
        assert_eq!(pool.attach(0, &b, 3), 3, "b's were kept");
        pool.release(0, &b[..3]);
        // Nothing fits beyond the pool.
        assert!(!pool.reserve(1, 10));
        assert_eq!(pool.held(1), 0);
        pool.check();
    }

    #[test]
    fn updates_send_only_what_changed() {
        let mut pool = BlockPool::new(8, 2, 2);
        pool.set_sharing(false);
        assert!(pool.reserve(0, 3));
        let first = pool.updates(&[0, 0]);
        assert_eq!(first.len(), 1);
        assert_eq!((first[0].first, first[0].blocks.len()), (0, 2));
        assert!(pool.updates(&[0]).is_empty());
        assert!(pool.reserve(0, 5));
        let grown = pool.updates(&[0]);
        assert_eq!((grown[0].first, grown[0].blocks.len()), (2, 1));
        pool.mark_sent(0, false);
        assert_eq!(pool.updates(&[0])[0].blocks.len(), 3);
        // Without sharing a new prompt shares nothing, but the blocks can still be found (to
        // save a slot's conversation).
        pool.release(0, &[1, 2, 3, 4, 5]);
        assert_eq!(pool.attach(0, &[1, 2, 3, 4, 5], 4), 0);
        assert_eq!(pool.find(1, &[1, 2, 3, 4, 5], 5), 5);
        pool.release(1, &[1, 2, 3, 4, 5]);
        pool.check();
    }
}
