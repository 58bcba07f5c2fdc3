//! Shared memory inside each host, gRPC between one leader per host (DESIGN section 4).
//!
//! An AllReduce sums inside the host first (shm, in rank order), the host leaders then sum
//! their hosts' totals over gRPC (in leader order), and each leader hands the result back to
//! its host with a second shm AllReduce to which the other ranks contribute zeros. When every
//! host holds a contiguous range of ranks, as the coordinator numbers them, the additions
//! happen in rank order, so the bits are those of the flat transports for two hosts, and
//! differ only in how partial sums group for more.

use super::grpc::GrpcCollective;
use super::shm::ShmCollective;
use super::{Collective, TransportError};

pub struct Hierarchical<'a> {
    pub local: &'a mut ShmCollective,
    /// Set on each host's leader: the collective between leaders (and, on a pipeline stage's
    /// first rank, its links to the neighbouring stages).
    pub leaders: Option<&'a mut GrpcCollective>,
    /// Whether the group spans several hosts. A pipeline stage on one host has a leader
    /// collective only for its stage links: its sums end after the host's.
    pub cross_host: bool,
    pub rank_index: usize,
    pub rank_count: usize,
}

impl Hierarchical<'_> {
    fn all_reduce<T: Copy + Default>(
        &mut self,
        buffer: &mut [T],
        shm: fn(&mut ShmCollective, &mut [T]) -> Result<(), TransportError>,
        grpc: fn(&mut GrpcCollective, &mut [T]) -> Result<(), TransportError>,
    ) -> Result<(), TransportError> {
        let host_ranks = self.local.rank_count();
        if host_ranks > 1 {
            shm(self.local, buffer)?;
        }
        if !self.cross_host {
            return Ok(());
        }
        if let Some(leaders) = self.leaders.as_deref_mut() {
            grpc(leaders, buffer)?;
        }
        if host_ranks > 1 {
            if self.leaders.is_none() {
                buffer.fill(T::default());
            }
            shm(self.local, buffer)?;
        }
        Ok(())
    }
}

impl Collective for Hierarchical<'_> {
    fn rank_index(&self) -> usize {
        self.rank_index
    }

    fn rank_count(&self) -> usize {
        self.rank_count
    }

    fn begin_step(&mut self, step: u64) {
        self.local.begin_step(step);
        if let Some(leaders) = self.leaders.as_deref_mut() {
            leaders.begin_step(step);
        }
    }

    fn set_patient(&mut self, patient: bool) {
        self.local.set_patient(patient);
        if let Some(leaders) = self.leaders.as_deref_mut() {
            leaders.set_patient(patient);
        }
    }

    fn all_reduce_sum(&mut self, buffer: &mut [f32]) -> Result<(), TransportError> {
        self.all_reduce(
            buffer,
            |c, b| c.all_reduce_sum(b),
            |c, b| c.all_reduce_sum(b),
        )
    }

    fn all_reduce_sum_f64(&mut self, buffer: &mut [f64]) -> Result<(), TransportError> {
        self.all_reduce(
            buffer,
            |c, b| c.all_reduce_sum_f64(b),
            |c, b| c.all_reduce_sum_f64(b),
        )
    }

    // Inside one host (a pipeline stage's first rank, whose gRPC links serve only the
    // handoffs) the sums are the host's shared-memory ones: staged as its peers, which use
    // that collective directly, stage them.
    fn stage_f64(&mut self, len: usize) -> Result<Option<&mut [f64]>, TransportError> {
        if self.cross_host {
            return Ok(None);
        }
        self.local.stage_f64(len)
    }

    fn all_reduce_staged_f64(
        &mut self,
        len: usize,
        read: &mut dyn FnMut(usize, &[f64]),
    ) -> Result<(), TransportError> {
        self.local.all_reduce_staged_f64(len, read)
    }

    fn stage_f32(&mut self, len: usize) -> Result<Option<&mut [f32]>, TransportError> {
        if self.cross_host {
            return Ok(None);
        }
        self.local.stage_f32(len)
    }

    fn all_reduce_staged_f32(
        &mut self,
        len: usize,
        read: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<(), TransportError> {
        self.local.all_reduce_staged_f32(len, read)
    }

    fn receive_stage(&mut self, buffer: &mut [f32]) -> Result<(), TransportError> {
        match self.leaders.as_deref_mut() {
            Some(leaders) => leaders.receive_stage(buffer),
            None => Err(TransportError::Protocol(
                "only a stage's first rank receives from the previous stage".into(),
            )),
        }
    }

    fn send_stage(&mut self, buffer: &[f32]) -> Result<(), TransportError> {
        match self.leaders.as_deref_mut() {
            Some(leaders) => leaders.send_stage(buffer),
            None => Err(TransportError::Protocol(
                "only a stage's first rank sends to the next stage".into(),
            )),
        }
    }
}
