//! The durable usage spool: every finished attempt's [`UsageEvent`] is written
//! here, and fsynced, before the proxy forgets it; it leaves only once the
//! control plane has ACKed the batch that carried it (see `report`).
//!
//! # On disk
//!
//! A directory owned by one process at a time, holding:
//! - append-only segment files `usage-NNNNNN.log` (numbered, rolled at
//!   [`SEGMENT_BYTES`]); each record is `len: u32 LE` (of the payload),
//!   `crc32: u32 LE` (over `seq` and the payload), `seq: u64 LE`, then the
//!   prost-encoded `UsageEvent`;
//! - `acked`: the ACK watermark (`seq: u64 LE` + its CRC32), replaced
//!   atomically (temp file, fsync, rename, fsync of the directory). Every
//!   record with `seq <= watermark` is delivered.
//!
//! [`Spool::open`] scans the segments in order, keeps the records above the
//! watermark, and stops at the first torn or corrupt record: in the last
//! segment that is a crash mid-write and the file is truncated there; in an
//! older segment (which was fsynced whole before the roll, so it should not
//! happen) the rest of that segment is skipped with an error log rather than
//! refusing to start. Each open starts a fresh segment. Segments whose records
//! are all ACKed are deleted, except the one being written.
//!
//! # Writing
//!
//! One writer thread owns the active segment. [`Spool::append`] queues the
//! event and waits; the writer takes everything queued and whatever joins
//! within `GROUP_LINGER` (2 ms) of the first, assigns sequence numbers
//! (strictly increasing, also across restarts), writes the whole group, fsyncs
//! once (group commit: `relay_usage_spool_fsyncs_total` grows with groups,
//! not events), makes the group visible to
//! [`Spool::read_after`] in sequence order, and wakes the appenders and
//! [`Spool::notified`] waiters. An event is thus visible to the reporter only
//! once it is durable.
//!
//! When the disk refuses a group (full, read-only, an I/O error), the partial
//! write is cut off and the group is kept in memory all the same, visible to
//! the reporter like the others: the appenders get the error (the event is
//! not durable: lost if the process dies before the control plane ACKs it),
//! but a running data plane never drops usage because its disk is full. The
//! next group is tried on disk again.
//!
//! # Memory
//!
//! Every un-ACKed event is also kept in memory (for `read_after`), so memory
//! grows with the backlog: a few hundred bytes per event, i.e. a few hundred
//! MB for a million events spooled during a long control-plane outage. That is
//! the bound in practice: a data plane that cannot report for hours is an
//! incident, and the `relay_usage_spool_depth` and
//! `relay_usage_spool_oldest_age_seconds` gauges alert long before.
//!
//! Architecture invariant: an event is removed (from memory or disk) only by
//! [`Spool::ack_through`], i.e. after the control plane committed it.

use prost::Message;
use relay_proto::v1::UsageEvent;
use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{self, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use tokio::sync::{oneshot, Notify};

/// A segment is rolled once it reaches this size.
pub const SEGMENT_BYTES: u64 = 8 << 20;
/// Largest encoded event accepted (a real one is a few hundred bytes); a
/// larger length read back from disk means corruption.
pub const MAX_EVENT_BYTES: usize = 1 << 20;
/// `len` + `crc32` + `seq`.
const HEADER: usize = 16;
/// At most this many appends share one write + fsync.
const MAX_GROUP: usize = 8192;
/// How long the writer waits for more appends after the first of a group.
const GROUP_LINGER: std::time::Duration = std::time::Duration::from_millis(2);
const WATERMARK: &str = "acked";
const WATERMARK_TMP: &str = "acked.tmp";

#[derive(Debug, Clone, thiserror::Error)]
pub enum SpoolError {
    #[error("usage spool: cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
    #[error("usage spool: the writer has stopped")]
    Closed,
    #[error("usage spool: event of {0} bytes exceeds the {MAX_EVENT_BYTES}-byte limit")]
    TooLarge(usize),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SpoolError + 'a {
    move |e| SpoolError::Io {
        op,
        path: path.to_path_buf(),
        source: Arc::new(e),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Segment {
    path: PathBuf,
    /// Highest seq written to it (None: no record).
    last_seq: Option<u64>,
}

struct State {
    /// Un-ACKed events, in seq order: durable, except those the disk refused.
    pending: VecDeque<(u64, UsageEvent)>,
    /// Oldest first; the last one is the writer's active segment.
    segments: VecDeque<Segment>,
    /// Highest durable (visible) seq.
    last_seq: u64,
    /// In-memory ACK watermark.
    acked: u64,
}

struct Shared {
    dir: PathBuf,
    state: Mutex<State>,
    /// The watermark persisted in `acked`; the lock serializes its writes.
    persisted: Mutex<u64>,
    notify: Notify,
    fsyncs: AtomicU64,
}

struct Request {
    event: UsageEvent,
    done: Done,
}

/// Who learns that an append is durable (or failed).
enum Done {
    Waiter(oneshot::Sender<Result<(), SpoolError>>),
    /// Run on the writer thread: no task, no cross-thread wake-up per event.
    Callback(Box<dyn FnOnce(Result<(), SpoolError>) + Send>),
}

impl Done {
    fn send(self, result: Result<(), SpoolError>) {
        match self {
            Done::Waiter(w) => {
                let _ = w.send(result);
            }
            Done::Callback(f) => f(result),
        }
    }
}

/// The spool of one data plane. `Send + Sync`; share it behind an `Arc`.
/// Dropping it stops the writer thread (after it finished the group in hand).
pub struct Spool {
    shared: Arc<Shared>,
    tx: Option<mpsc::Sender<Request>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Spool {
    /// Opens (creating) the spool in `dir` and recovers the un-ACKed events
    /// found there. Only one `Spool` may use a directory at a time.
    pub fn open(dir: &Path) -> Result<Spool, SpoolError> {
        Self::open_with(dir, SEGMENT_BYTES)
    }

    fn open_with(dir: &Path, segment_bytes: u64) -> Result<Spool, SpoolError> {
        fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        let tmp = dir.join(WATERMARK_TMP);
        match fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", &tmp)(e)),
        }
        let acked = read_watermark(dir)?;

        let mut files = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
            let entry = entry.map_err(io_err("list", dir))?;
            if let Some(id) = entry.file_name().to_str().and_then(segment_id) {
                files.push((id, entry.path()));
            }
        }
        files.sort_by_key(|(id, _)| *id);

        let mut pending = VecDeque::new();
        let mut segments = VecDeque::new();
        let mut max_seq = acked;
        let mut prev_seq = 0u64;
        let count = files.len();
        for (i, (_, path)) in files.iter().enumerate() {
            let bytes = match fs::read(path) {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("read", path)(e)),
            };
            let scan = scan_segment(&bytes, prev_seq);
            if let Some(why) = scan.corrupt {
                if i + 1 == count {
                    tracing::warn!(
                        segment = %path.display(),
                        offset = scan.valid_len,
                        dropped_bytes = bytes.len() - scan.valid_len,
                        reason = why,
                        "usage spool: torn record at the end of the last segment (a crash mid-write); truncating"
                    );
                    let f = OpenOptions::new()
                        .write(true)
                        .open(path)
                        .map_err(io_err("open", path))?;
                    f.set_len(scan.valid_len as u64).map_err(io_err("truncate", path))?;
                    f.sync_all().map_err(io_err("fsync", path))?;
                } else {
                    tracing::error!(
                        segment = %path.display(),
                        offset = scan.valid_len,
                        reason = why,
                        "usage spool: corrupt record in a closed segment; the rest of that segment is skipped"
                    );
                }
            }
            let mut last = None;
            for (seq, event) in scan.records {
                prev_seq = seq;
                last = Some(seq);
                max_seq = max_seq.max(seq);
                if seq > acked {
                    pending.push_back((seq, event));
                }
            }
            segments.push_back(Segment {
                path: path.clone(),
                last_seq: last,
            });
        }
        // Closed segments that hold nothing un-ACKed.
        segments.retain(|s| {
            if s.last_seq.is_some_and(|l| l > acked) {
                return true;
            }
            remove_segment(&s.path);
            false
        });

        let next_id = files.last().map_or(1, |(id, _)| id + 1);
        let (file, path) = create_segment(dir, next_id)?;
        segments.push_back(Segment {
            path: path.clone(),
            last_seq: None,
        });
        sync_dir(dir)?;

        let depth = pending.len();
        if depth > 0 {
            tracing::info!(pending = depth, dir = %dir.display(), "usage spool: recovered un-ACKed events");
        }
        metrics::gauge!(relay_proto::metrics::USAGE_SPOOL_DEPTH).set(depth as f64);
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            state: Mutex::new(State {
                pending,
                segments,
                last_seq: max_seq,
                acked,
            }),
            persisted: Mutex::new(acked),
            notify: Notify::new(),
            fsyncs: AtomicU64::new(0),
        });
        let writer = Writer {
            shared: shared.clone(),
            file,
            path,
            id: next_id,
            len: 0,
            next_seq: max_seq + 1,
            segment_bytes,
            broken: false,
        };
        let (tx, rx) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("usage-spool".into())
            .spawn(move || writer.run(rx))
            .map_err(io_err("start the writer for", dir))?;
        Ok(Spool {
            shared,
            tx: Some(tx),
            writer: Some(handle),
        })
    }

    /// Appends `event`; durable (written and fsynced) when this resolves Ok.
    /// Concurrent appends share one fsync. Dropping the future after it was
    /// first polled does not withdraw the event.
    pub async fn append(&self, event: UsageEvent) -> Result<(), SpoolError> {
        let len = event.encoded_len();
        if len > MAX_EVENT_BYTES {
            return Err(SpoolError::TooLarge(len));
        }
        let (done, rx) = oneshot::channel();
        let tx = self.tx.as_ref().ok_or(SpoolError::Closed)?;
        tx.send(Request {
            event,
            done: Done::Waiter(done),
        })
        .map_err(|_| SpoolError::Closed)?;
        rx.await.map_err(|_| SpoolError::Closed)?
    }

    /// Like [`Spool::append`] without waiting: `then` runs (on the writer
    /// thread, or here when the spool cannot take the event) once the event is
    /// durable or has failed. For the request path, which must not wait.
    pub fn append_then(&self, event: UsageEvent, then: impl FnOnce(Result<(), SpoolError>) + Send + 'static) {
        let len = event.encoded_len();
        if len > MAX_EVENT_BYTES {
            return then(Err(SpoolError::TooLarge(len)));
        }
        let Some(tx) = self.tx.as_ref() else {
            return then(Err(SpoolError::Closed));
        };
        if let Err(mpsc::SendError(r)) = tx.send(Request {
            event,
            done: Done::Callback(Box::new(then)),
        }) {
            r.done.send(Err(SpoolError::Closed));
        }
    }

    /// Up to `max` un-ACKed events with `seq > after_seq`, in seq order.
    /// The reporter passes the last seq it handed out, or 0 to start over.
    pub fn read_after(&self, after_seq: u64, max: usize) -> Vec<(u64, UsageEvent)> {
        let st = lock(&self.shared.state);
        let start = st.pending.partition_point(|(s, _)| *s <= after_seq);
        st.pending.range(start..).take(max).cloned().collect()
    }

    /// Every event with `seq <= upto` is ACKed: forgets it, persists the
    /// watermark, and deletes the segments that hold nothing un-ACKed. Blocks
    /// on an fsync: call it from a blocking context.
    ///
    /// The in-memory state is updated even when persisting fails (the error
    /// is returned): at worst a restart resends what was ACKed.
    pub fn ack_through(&self, upto: u64) -> Result<(), SpoolError> {
        let upto = {
            let mut st = lock(&self.shared.state);
            // Never beyond what is visible: a later event must not be born ACKed.
            let upto = upto.min(st.last_seq);
            if upto > st.acked {
                st.acked = upto;
                while st.pending.front().is_some_and(|(s, _)| *s <= upto) {
                    st.pending.pop_front();
                }
                metrics::gauge!(relay_proto::metrics::USAGE_SPOOL_DEPTH).set(st.pending.len() as f64);
            }
            st.acked
        };
        let mut persisted = lock(&self.shared.persisted);
        if upto <= *persisted {
            return Ok(());
        }
        write_watermark(&self.shared.dir, upto)?;
        *persisted = upto;
        let done: Vec<Segment> = {
            let mut st = lock(&self.shared.state);
            let mut done = Vec::new();
            while st.segments.len() > 1
                && st
                    .segments
                    .front()
                    .is_some_and(|s| s.last_seq.is_none_or(|l| l <= upto))
            {
                done.extend(st.segments.pop_front());
            }
            done
        };
        drop(persisted);
        for s in done {
            remove_segment(&s.path);
        }
        Ok(())
    }

    /// Events not ACKed.
    pub fn depth(&self) -> u64 {
        lock(&self.shared.state).pending.len() as u64
    }

    /// `timestamp_ms` of the oldest un-ACKed event.
    pub fn oldest_unacked_ms(&self) -> Option<i64> {
        lock(&self.shared.state).pending.front().map(|(_, e)| e.timestamp_ms)
    }

    /// Seq of the oldest un-ACKed event.
    pub fn first_unacked_seq(&self) -> Option<u64> {
        lock(&self.shared.state).pending.front().map(|(s, _)| *s)
    }

    /// Resolves after the next group of events becomes readable. The future
    /// is armed when created: create it, then check `read_after`, then await
    /// it, and no append is missed.
    pub fn notified(&self) -> impl Future<Output = ()> + '_ {
        self.shared.notify.notified()
    }

    /// fsyncs of segment data done by this spool (one per group commit).
    pub fn fsyncs(&self) -> u64 {
        self.shared.fsyncs.load(Ordering::Relaxed)
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
    }
}

struct Writer {
    shared: Arc<Shared>,
    file: File,
    path: PathBuf,
    id: u64,
    len: u64,
    next_seq: u64,
    segment_bytes: u64,
    /// A write failed: the tail of the active segment is suspect; roll first.
    broken: bool,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Request>) {
        let mut buf = Vec::new();
        while let Ok(first) = rx.recv() {
            let mut group = vec![first];
            // Group commit with a short linger: appends that arrive within
            // GROUP_LINGER of the first share its fsync (under load, one fsync
            // per few ms instead of one per handful of events).
            // Sleeping (rather than waiting on the channel) means appenders
            // never wake this thread one by one.
            std::thread::sleep(GROUP_LINGER);
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(r) => group.push(r),
                    Err(_) => break,
                }
            }
            let (events, waiters): (Vec<_>, Vec<_>) = group.into_iter().map(|r| (r.event, r.done)).unzip();
            let result = self.commit(events, &mut buf);
            // Durable or kept in memory only (the disk refused it): either way the events are
            // visible to the reporter now.
            self.shared.notify.notify_waiters();
            for w in waiters {
                w.send(result.clone());
            }
        }
    }

    /// Writes and fsyncs `events`. When the disk refuses them (full, read-only, I/O error) they
    /// are kept in memory all the same and sent like the others: not durable (lost if the process
    /// dies before the control plane ACKs them), but never dropped while it runs. The error says so.
    fn commit(&mut self, events: Vec<UsageEvent>, buf: &mut Vec<u8>) -> Result<(), SpoolError> {
        let rolled = if self.broken || self.len >= self.segment_bytes {
            self.roll()
        } else {
            Ok(())
        };
        buf.clear();
        let mut records = Vec::with_capacity(events.len());
        for event in events {
            let seq = self.next_seq;
            self.next_seq += 1;
            encode_record(buf, seq, &event);
            records.push((seq, event));
        }
        let written = rolled.and_then(|()| {
            self.file
                .write_all(buf)
                .and_then(|()| self.file.sync_data())
                .map_err(|e| {
                    // Cut the partial group off and write the next group where it began; when
                    // that fails too, start a new segment for the next one so a bad tail never
                    // sits before good records. (Rolling on every failure would leave an empty
                    // segment per group on a full disk.)
                    let len = self.len;
                    self.broken = self
                        .file
                        .set_len(len)
                        .and_then(|()| self.file.seek(io::SeekFrom::Start(len)))
                        .is_err();
                    io_err("write", &self.path)(e)
                })
        });
        if written.is_ok() {
            self.len += buf.len() as u64;
            self.shared.fsyncs.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(relay_proto::metrics::USAGE_SPOOL_FSYNCS_TOTAL).increment(1);
        }

        let mut st = lock(&self.shared.state);
        if let Some((last, _)) = records.last() {
            st.last_seq = *last;
            if let Some(seg) = st.segments.back_mut() {
                // Also when kept in memory only: the segment is then deleted once these are ACKed
                // (later, never earlier, than its own records).
                seg.last_seq = Some(*last);
            }
        }
        st.pending.extend(records);
        metrics::gauge!(relay_proto::metrics::USAGE_SPOOL_DEPTH).set(st.pending.len() as f64);
        written
    }

    fn roll(&mut self) -> Result<(), SpoolError> {
        // The number is spent even if creating fails: a file made before a later step failed
        // must not block the next roll (segments are created exclusively).
        let id = self.id + 1;
        self.id = id;
        let (file, path) = create_segment(&self.shared.dir, id)?;
        sync_dir(&self.shared.dir)?;
        self.file = file;
        self.path = path.clone();
        self.len = 0;
        self.broken = false;
        lock(&self.shared.state)
            .segments
            .push_back(Segment { path, last_seq: None });
        Ok(())
    }
}

fn segment_id(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("usage-")?.strip_suffix(".log")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("usage-{id:06}.log"))
}

fn create_segment(dir: &Path, id: u64) -> Result<(File, PathBuf), SpoolError> {
    let path = segment_path(dir, id);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io_err("create", &path))?;
    Ok((file, path))
}

fn remove_segment(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        // Left behind, it is filtered by the watermark and removed at the next open.
        Err(e) => tracing::warn!(segment = %path.display(), error = %e, "usage spool: cannot delete an ACKed segment"),
    }
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn encode_record(buf: &mut Vec<u8>, seq: u64, event: &UsageEvent) {
    let payload = event.encode_to_vec();
    let seq_bytes = seq.to_le_bytes();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&seq_bytes);
    crc.update(&payload);
    // `append` bounds events to MAX_EVENT_BYTES, far below u32::MAX.
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&crc.finalize().to_le_bytes());
    buf.extend_from_slice(&seq_bytes);
    buf.extend_from_slice(&payload);
}

struct Scan {
    records: Vec<(u64, UsageEvent)>,
    /// Bytes up to the end of the last good record.
    valid_len: usize,
    corrupt: Option<&'static str>,
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Reads records until the end or the first bad one. Seqs must exceed `prev_seq`.
fn scan_segment(bytes: &[u8], mut prev_seq: u64) -> Scan {
    let mut records = Vec::new();
    let mut off = 0usize;
    let corrupt = loop {
        let rest = &bytes[off..];
        if rest.is_empty() {
            break None;
        }
        if rest.len() < HEADER {
            break Some("truncated header");
        }
        let len = le_u32(&rest[0..4]) as usize;
        let crc = le_u32(&rest[4..8]);
        if len > MAX_EVENT_BYTES {
            break Some("impossible length");
        }
        if rest.len() < HEADER + len {
            break Some("truncated payload");
        }
        let seq_bytes = &rest[8..16];
        let payload = &rest[HEADER..HEADER + len];
        let mut h = crc32fast::Hasher::new();
        h.update(seq_bytes);
        h.update(payload);
        if h.finalize() != crc {
            break Some("checksum mismatch");
        }
        let seq = le_u64(seq_bytes);
        if seq <= prev_seq {
            break Some("sequence number out of order");
        }
        let Ok(event) = UsageEvent::decode(payload) else {
            break Some("undecodable event");
        };
        prev_seq = seq;
        records.push((seq, event));
        off += HEADER + len;
    };
    Scan {
        records,
        valid_len: off,
        corrupt,
    }
}

fn read_watermark(dir: &Path) -> Result<u64, SpoolError> {
    let path = dir.join(WATERMARK);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_err("read", &path)(e)),
    };
    if bytes.len() == 12 && crc32fast::hash(&bytes[..8]) == le_u32(&bytes[8..12]) {
        return Ok(le_u64(&bytes[..8]));
    }
    // Cannot happen with the atomic rename; resending everything is safe.
    tracing::error!(file = %path.display(), "usage spool: unreadable ACK watermark; every spooled event will be resent");
    Ok(0)
}

fn write_watermark(dir: &Path, seq: u64) -> Result<(), SpoolError> {
    let tmp = dir.join(WATERMARK_TMP);
    let path = dir.join(WATERMARK);
    let mut bytes = seq.to_le_bytes().to_vec();
    bytes.extend_from_slice(&crc32fast::hash(&seq.to_le_bytes()).to_le_bytes());
    let mut f = File::create(&tmp).map_err(io_err("create", &tmp))?;
    f.write_all(&bytes).map_err(io_err("write", &tmp))?;
    f.sync_all().map_err(io_err("fsync", &tmp))?;
    drop(f);
    fs::rename(&tmp, &path).map_err(io_err("rename", &tmp))?;
    sync_dir(dir)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn event(i: u64) -> UsageEvent {
        UsageEvent {
            event_id: format!("00000000-0000-7000-8000-{i:012}"),
            request_id: format!("req-{i}"),
            timestamp_ms: 1_700_000_000_000 + i as i64,
            node_id: "node-1".into(),
            model: "claude-sonnet-4-5".into(),
            input_tokens: i,
            ..UsageEvent::default()
        }
    }

    fn ids(events: &[(u64, UsageEvent)]) -> Vec<u64> {
        events.iter().map(|(_, e)| e.input_tokens).collect()
    }

    fn segments(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().and_then(|n| n.to_str()).and_then(segment_id).is_some())
            .collect();
        v.sort();
        v
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_appends_are_durable_in_seq_order_and_grouped() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        let n = 400u64;
        let tasks: Vec<_> = (1..=n)
            .map(|i| {
                let s = spool.clone();
                tokio::spawn(async move { s.append(event(i)).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(spool.depth(), n);
        let all = spool.read_after(0, usize::MAX);
        let seqs: Vec<u64> = all.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, (1..=n).collect::<Vec<_>>(), "seqs are dense and increasing");
        let mut got = ids(&all);
        got.sort_unstable();
        assert_eq!(got, (1..=n).collect::<Vec<_>>());
        assert!(
            spool.fsyncs() < n,
            "group commit shares fsyncs: {} fsyncs for {n} appends",
            spool.fsyncs()
        );
        assert!(spool.fsyncs() >= 1);

        // read_after pages.
        let page = spool.read_after(10, 5);
        assert_eq!(
            page.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![11, 12, 13, 14, 15]
        );
        assert!(spool.read_after(n, 10).is_empty());
        assert_eq!(spool.first_unacked_seq(), Some(1));

        // Durable: a reopen reads back the same events under the same seqs.
        drop(spool);
        let spool = Spool::open(dir.path()).unwrap();
        let again = spool.read_after(0, usize::MAX);
        assert_eq!(again, all);
    }

    #[tokio::test]
    async fn reopen_recovers_exactly_the_unacked_ones() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        for i in 1..=10 {
            spool.append(event(i)).await.unwrap();
        }
        spool.ack_through(4).unwrap();
        assert_eq!(spool.depth(), 6);
        assert_eq!(spool.first_unacked_seq(), Some(5));
        assert_eq!(spool.oldest_unacked_ms(), Some(event(5).timestamp_ms));
        drop(spool);

        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(spool.depth(), 6);
        assert_eq!(ids(&spool.read_after(0, 100)), vec![5, 6, 7, 8, 9, 10]);
        // Seqs keep increasing across the restart.
        spool.append(event(11)).await.unwrap();
        let all = spool.read_after(0, 100);
        assert_eq!(all.last().map(|(s, _)| *s), Some(11));

        spool.ack_through(11).unwrap();
        assert_eq!(spool.depth(), 0);
        assert_eq!(spool.oldest_unacked_ms(), None);
        assert_eq!(spool.first_unacked_seq(), None);
        drop(spool);

        // Fully ACKed: nothing is resent, and seqs still never go back.
        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(spool.depth(), 0);
        assert!(spool.read_after(0, 100).is_empty());
        spool.append(event(12)).await.unwrap();
        assert_eq!(spool.read_after(0, 10).first().map(|(s, _)| *s), Some(12));
    }

    #[tokio::test]
    async fn ack_beyond_visible_is_clamped() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        spool.append(event(1)).await.unwrap();
        spool.ack_through(1_000).unwrap();
        spool.append(event(2)).await.unwrap();
        assert_eq!(ids(&spool.read_after(0, 10)), vec![2]);
        drop(spool);
        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(ids(&spool.read_after(0, 10)), vec![2]);
    }

    #[tokio::test]
    async fn torn_final_record_is_dropped_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        for i in 1..=5 {
            spool.append(event(i)).await.unwrap();
        }
        drop(spool);
        let seg = segments(dir.path()).pop().unwrap();
        let len = fs::metadata(&seg).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 3)
            .unwrap();

        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(ids(&spool.read_after(0, 100)), vec![1, 2, 3, 4]);
        assert!(
            fs::metadata(&seg).unwrap().len() < len - 3,
            "the torn record was truncated away"
        );
        spool.append(event(6)).await.unwrap();
        drop(spool);

        let spool = Spool::open(dir.path()).unwrap();
        let all = spool.read_after(0, 100);
        assert_eq!(ids(&all), vec![1, 2, 3, 4, 6]);
        let seqs: Vec<u64> = all.iter().map(|(s, _)| *s).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    }

    #[tokio::test]
    async fn corrupt_byte_in_last_record_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        for i in 1..=3 {
            spool.append(event(i)).await.unwrap();
        }
        drop(spool);
        let seg = segments(dir.path()).pop().unwrap();
        let mut bytes = fs::read(&seg).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&seg, &bytes).unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(ids(&spool.read_after(0, 100)), vec![1, 2]);
    }

    #[tokio::test]
    async fn acked_segments_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        // Each open starts a segment: three opens leave three segments.
        for round in 0..3u64 {
            let spool = Spool::open(dir.path()).unwrap();
            for i in 1..=4 {
                spool.append(event(round * 10 + i)).await.unwrap();
            }
        }
        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(segments(dir.path()).len(), 4);
        assert_eq!(spool.depth(), 12);
        // The first segment holds seqs 1..=4 and the second 5..=8.
        spool.ack_through(6).unwrap();
        assert_eq!(segments(dir.path()).len(), 3);
        spool.ack_through(12).unwrap();
        assert_eq!(segments(dir.path()).len(), 1, "only the active segment is left");
        drop(spool);
        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(spool.depth(), 0);
    }

    #[tokio::test]
    async fn segments_roll_and_are_dropped_once_acked() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open_with(dir.path(), 1024).unwrap();
        for i in 1..=200 {
            spool.append(event(i)).await.unwrap();
        }
        let rolled = segments(dir.path()).len();
        assert!(rolled > 5, "{rolled} segments");
        spool.ack_through(100).unwrap();
        let left = segments(dir.path()).len();
        assert!(left < rolled && left > 1, "{left} of {rolled} segments left");
        drop(spool);
        let spool = Spool::open_with(dir.path(), 1024).unwrap();
        assert_eq!(ids(&spool.read_after(0, 1_000)), (101..=200).collect::<Vec<_>>());
        spool.ack_through(200).unwrap();
        assert_eq!(segments(dir.path()).len(), 1);
    }

    #[tokio::test]
    async fn notified_wakes_on_append() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        let wake = spool.notified();
        assert!(spool.read_after(0, 1).is_empty());
        let s = spool.clone();
        tokio::spawn(async move { s.append(event(1)).await.unwrap() });
        tokio::time::timeout(std::time::Duration::from_secs(10), wake)
            .await
            .expect("woken by the append");
        assert_eq!(spool.depth(), 1);
    }

    #[test]
    fn segment_names() {
        assert_eq!(segment_id("usage-000001.log"), Some(1));
        assert_eq!(segment_id("usage-1234567.log"), Some(1_234_567));
        assert_eq!(segment_id("usage-.log"), None);
        assert_eq!(segment_id("usage-+1.log"), None);
        assert_eq!(segment_id("acked"), None);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod props {
    //! Property tests of the record reader: whatever a segment file holds (torn writes, flipped
    //! bits, garbage), reading it never panics and yields only records that were written, in order,
    //! up to the first damage.
    use super::*;
    use proptest::prelude::*;

    fn event(i: u64, model: &str) -> UsageEvent {
        UsageEvent {
            event_id: format!("e{i}"),
            model: model.to_string(),
            input_tokens: i * 7,
            ..Default::default()
        }
    }

    proptest! {
        #[test]
        fn damaged_segments_yield_a_prefix_of_what_was_written(
            models in proptest::collection::vec("[a-z-]{0,40}", 1..20),
            cut in any::<proptest::sample::Index>(),
            flip in any::<Option<(proptest::sample::Index, u8)>>(),
        ) {
            let written: Vec<(u64, UsageEvent)> =
                models.iter().enumerate().map(|(i, m)| (i as u64 + 1, event(i as u64, m))).collect();
            let mut buf = Vec::new();
            for (seq, e) in &written {
                encode_record(&mut buf, *seq, e);
            }
            let whole = scan_segment(&buf, 0);
            prop_assert_eq!(&whole.records, &written);
            prop_assert_eq!(whole.valid_len, buf.len());
            prop_assert!(whole.corrupt.is_none());
            let mut damaged = buf[..cut.index(buf.len() + 1)].to_vec();
            if let Some((at, bits)) = flip {
                if !damaged.is_empty() && bits != 0 {
                    let i = at.index(damaged.len());
                    damaged[i] ^= bits;
                }
            }
            let scan = scan_segment(&damaged, 0);
            prop_assert!(scan.valid_len <= damaged.len());
            prop_assert!(scan.records.len() <= written.len());
            prop_assert_eq!(&scan.records[..], &written[..scan.records.len()]);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048), prev in any::<u64>()) {
            let scan = scan_segment(&bytes, prev);
            prop_assert!(scan.valid_len <= bytes.len());
            prop_assert!(scan.records.windows(2).all(|w| w[0].0 < w[1].0));
        }
    }
}
