//! Every limit's default in one place. The typed configurations that carry them at run time
//! (`ClusterLimits` for the cluster's deadlines, the server's and worker's options) take their
//! defaults from here, and the bounds on untrusted input (messages, frames, requests) are
//! these constants.

use std::time::Duration;

// Deadlines of the cluster (`ClusterLimits`).
/// Reaching a worker and its Hello.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A `--local` worker printing its address.
pub const WORKER_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Loading a shard (streaming it to a worker without the model included).
pub const LOAD_TIMEOUT: Duration = Duration::from_secs(600);
/// One forward pass, on every worker.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(300);
/// One AllReduce waiting for its peers (`--collective-timeout`). Ranks of one step start
/// together and do the same work, so a peer later than this is dead, stuck or cut off; it
/// bounds how soon a data-plane link fault fails the step.
pub const COLLECTIVE_TIMEOUT: Duration = Duration::from_millis(2500);
/// HTTP/2 pings on the control plane while a call is in flight, and how long one may go
/// unanswered: a worker cut off from the coordinator fails its call within about 2 s.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_millis(500);
pub const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_millis(1500);
/// How often an idle coordinator calls each worker.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// How long a silent coordinator keeps its workers from another.
pub const OWNER_LEASE: Duration = Duration::from_secs(5);

// Cluster size.
/// Workers (ranks) one model may be split across.
pub const MAX_RANKS: usize = 16;

// Messages.
/// Largest control-plane message either side accepts.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// Values per data-plane frame, and the largest frame accepted (f64 values plus a header).
pub const FRAME_VALUES: usize = 64 * 1024;
pub const MAX_FRAME_BYTES: usize = FRAME_VALUES * 8 + 4096;
/// HTTP/2 flow-control window of a data-plane stream.
pub const WINDOW_BYTES: u32 = 4 << 20;
/// Candidates a worker returns per position at most.
pub const MAX_TOP_K: u32 = 1000;

// The server (`tp-coordinator serve`).
/// Context window per sequence slot (`-c`).
pub const CONTEXT: usize = 4096;
/// Sequence slots (`--parallel`), and the most allowed.
pub const PARALLEL: usize = 4;
pub const MAX_PARALLEL: usize = 256;
/// Tokens per forward pass (`-b`).
pub const BATCH: usize = 512;
/// Prompt tokens per pass while other sequences generate (`--prompt-chunk`).
pub const PROMPT_CHUNK: usize = 128;
/// Requests waiting for a slot before the server answers 503 (`--queue`).
pub const QUEUE: usize = 16;
/// Stop strings per request, and log-probability alternatives per token.
pub const MAX_STOP_STRINGS: usize = 4;
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Choices per request (`n`).
pub const MAX_CHOICES: usize = 16;
