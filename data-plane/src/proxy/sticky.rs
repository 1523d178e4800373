//! Sticky sessions: the requests of one conversation stay on one account, so
//! the upstream's prompt cache stays warm.
//!
//! [`session_key`] derives a short key from a request, from the first of:
//!
//! 1. `h:` the `X-Claude-Code-Session-Id` header (newer Claude Code versions);
//!    the body is not parsed at all;
//! 2. `m:` the session id inside `metadata.user_id`: the older
//!    `user_<64hex>_account_<uuid>_session_<uuid>` form, or the newer JSON
//!    string `{"device_id":…,"account_uuid":…,"session_id":…}`. Any other
//!    `user_id` (an app's own user id) names a user, not a session, and is
//!    ignored;
//! 3. `c:` a SHA-256 of the system prompt and the first user message,
//!    normalised so it does not change across turns: every `cache_control`
//!    field is dropped at any depth (clients move the cache breakpoint to the
//!    newest message each turn), string content is hashed exactly like
//!    `[{"type":"text","text":…}]`, JSON escapes are decoded, and system text
//!    blocks starting with `x-anthropic-billing-header:` (Claude Code's
//!    per-request metadata) are skipped. Strings longer than 8 KiB are hashed
//!    by length, head and tail: a collision only puts two conversations on one
//!    account.
//!
//! Values that are long or not plain printable ASCII are replaced by 32 hex
//! digits of their SHA-256, so a key is at most 66 bytes. No source, or no
//! user message in the body: `None`. Invalid JSON: `None`.
//!
//! The body is parsed once into borrowed pieces (`RawValue`s for `metadata`
//! and `system`, only the first user message's `content` out of `messages`),
//! then the two pieces are streamed into the hash as they are read: no
//! `Value` tree, no per-string allocation.
//!
//! Keys are not scoped by client key or group: a session bound to an account
//! the request may not use (another group, unhealthy) must be ignored by the
//! caller, which then rebinds it.
//!
//! [`SessionStore`] is the one interface for remembering bindings;
//! [`MemorySessions`] is the in-process implementation (a distributed one can
//! implement the same trait).

use serde::de::{DeserializeSeed, Deserializer, Error as _, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The session header sent by newer Claude Code versions.
pub const SESSION_HEADER: &str = "x-claude-code-session-id";
/// Values up to this length (plain printable ASCII) are kept as they are in a key.
const MAX_RAW_KEY: usize = 64;
/// System text blocks starting with this are per-request metadata, not prompt.
const BILLING_PREFIX: &str = "x-anthropic-billing-header:";
/// Strings longer than twice this are hashed by length, head and tail.
const SAMPLE: usize = 4096;
/// Deeper JSON than this in the hashed parts gives no content key.
const MAX_DEPTH: u8 = 64;

/// The session key of a request (see the module docs for the sources and
/// their precedence), prefixed by its source: `h:`, `m:` or `c:`.
pub fn session_key(headers: &http::HeaderMap, body: &[u8]) -> Option<String> {
    if let Some(v) = headers.get(SESSION_HEADER) {
        let v = v.as_bytes().trim_ascii();
        if !v.is_empty() {
            return Some(short_key("h:", v));
        }
    }
    let head: Head<'_> = serde_json::from_slice(body).ok()?;
    if let Some(session) = head.metadata.and_then(metadata_session) {
        return Some(short_key("m:", session.as_bytes()));
    }
    let content = head.messages?.content?;
    content_key(head.system, content)
}

#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    metadata: Option<&'a RawValue>,
    #[serde(borrow)]
    system: Option<&'a RawValue>,
    #[serde(borrow)]
    messages: Option<FirstUser<'a>>,
}

#[derive(Deserialize)]
struct Metadata<'a> {
    #[serde(borrow)]
    user_id: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct UserIdJson<'a> {
    #[serde(borrow)]
    session_id: Option<Cow<'a, str>>,
}

/// The session id in `metadata.user_id`, in either of Claude Code's formats.
fn metadata_session(raw: &RawValue) -> Option<String> {
    let meta: Metadata<'_> = serde_json::from_str(raw.get()).ok()?;
    let user_id = meta.user_id?;
    let user_id = user_id.trim();
    let session = if user_id.starts_with('{') {
        let inner: UserIdJson<'_> = serde_json::from_str(user_id).ok()?;
        inner.session_id?.trim().to_string()
    } else if user_id.starts_with("user_") {
        user_id.rsplit_once("_session_")?.1.trim().to_string()
    } else {
        return None;
    };
    (!session.is_empty()).then_some(session)
}

fn hex32(digest: &[u8]) -> String {
    relay_proto::hex(&digest[..digest.len().min(16)])
}

/// `prefix` + the value if it is short plain printable ASCII, else + 32 hex digits of its SHA-256.
fn short_key(prefix: &str, v: &[u8]) -> String {
    match std::str::from_utf8(v) {
        Ok(plain) if v.len() <= MAX_RAW_KEY && v.iter().all(u8::is_ascii_graphic) => {
            let mut s = String::with_capacity(prefix.len() + v.len());
            s.push_str(prefix);
            s.push_str(plain);
            s
        }
        _ => {
            let mut s = String::with_capacity(prefix.len() + 32);
            s.push_str(prefix);
            s.push_str(&hex32(&Sha256::digest(v)));
            s
        }
    }
}

// ---------------------------------------------------------------------------
// The first user message, without collecting the others.

/// `content` of the first message whose role is `user`; the rest of the
/// array is skipped without being materialised.
struct FirstUser<'a> {
    content: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct MessageHead<'a> {
    #[serde(borrow)]
    role: Option<Cow<'a, str>>,
    #[serde(borrow)]
    content: Option<&'a RawValue>,
}

impl<'de: 'a, 'a> Deserialize<'de> for FirstUser<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = FirstUser<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of messages")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut content = None;
                while let Some(m) = seq.next_element::<MessageHead<'a>>()? {
                    if m.role.as_deref() == Some("user") {
                        content = m.content;
                        break;
                    }
                }
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(FirstUser { content })
            }
        }
        d.deserialize_seq(V(std::marker::PhantomData))
    }
}

// ---------------------------------------------------------------------------
// The content hash: a canonical byte stream fed to SHA-256 as the JSON is read.

fn content_key(system: Option<&RawValue>, content: &RawValue) -> Option<String> {
    let mut h = Sha256::new();
    h.update(b"relay-session-v1\0system");
    match system {
        Some(raw) => {
            let mut de = serde_json::Deserializer::from_str(raw.get());
            Content {
                out: &mut h,
                system: true,
            }
            .deserialize(&mut de)
            .ok()?;
        }
        None => h.update(b"[]"),
    }
    h.update(b"\0user");
    let mut de = serde_json::Deserializer::from_str(content.get());
    Content {
        out: &mut h,
        system: false,
    }
    .deserialize(&mut de)
    .ok()?;
    Some(format!("c:{}", hex32(&h.finalize())))
}

fn feed_str(h: &mut Sha256, s: &str) {
    let b = s.as_bytes();
    h.update((b.len() as u64).to_le_bytes());
    if b.len() <= 2 * SAMPLE {
        h.update(b);
    } else {
        h.update(&b[..SAMPLE]);
        h.update(&b[b.len() - SAMPLE..]);
    }
}

/// A top-level block, reduced to three digests so that key order and the
/// string shorthand do not matter.
#[derive(Default)]
struct BlockDigests {
    kind: Option<Sha256>,
    text: Option<Sha256>,
    rest: Option<Sha256>,
}

impl BlockDigests {
    fn text_block(s: &str) -> Self {
        let (mut kind, mut text) = (Sha256::new(), Sha256::new());
        feed_str(&mut kind, "text");
        feed_str(&mut text, s);
        Self {
            kind: Some(kind),
            text: Some(text),
            rest: None,
        }
    }

    fn emit(self, out: &mut Sha256) {
        out.update(b"B");
        for part in [self.kind, self.text, self.rest] {
            match part {
                Some(h) => {
                    out.update(b"+");
                    out.update(h.finalize());
                }
                None => out.update(b"-"),
            }
        }
    }
}

/// `system` or a message's `content`: a string (one text block), an array of
/// blocks, or null (no blocks).
struct Content<'h> {
    out: &'h mut Sha256,
    system: bool,
}

impl<'de> DeserializeSeed<'de> for Content<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Content<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string or an array of content blocks")
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        self.out.update(b"[]");
        Ok(())
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        self.out.update(b"[");
        if !(self.system && v.starts_with(BILLING_PREFIX)) {
            BlockDigests::text_block(v).emit(self.out);
        }
        self.out.update(b"]");
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Content { out, system } = self;
        out.update(b"[");
        while seq.next_element_seed(Block { out: &mut *out, system })?.is_some() {}
        out.update(b"]");
        Ok(())
    }
}

/// One content block (an object).
struct Block<'h> {
    out: &'h mut Sha256,
    system: bool,
}

impl<'de> DeserializeSeed<'de> for Block<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Block<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a content block")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut d = BlockDigests::default();
        let (mut is_text, mut billing) = (false, false);
        let mut rest = Sha256::new();
        let mut has_rest = false;
        while let Some(key) = map.next_key_seed(KeySeed {
            h: &mut rest,
            special: true,
        })? {
            match key {
                Key::CacheControl => {
                    map.next_value::<IgnoredAny>()?;
                }
                Key::Type => {
                    let h = d.kind.get_or_insert_with(Sha256::new);
                    let s = map.next_value_seed(StrSeed { h })?;
                    is_text = s.is_text;
                }
                Key::Text => {
                    let h = d.text.get_or_insert_with(Sha256::new);
                    let s = map.next_value_seed(StrSeed { h })?;
                    billing = s.billing;
                }
                Key::Other => {
                    has_rest = true;
                    map.next_value_seed(Canon { h: &mut rest, depth: 1 })?;
                }
            }
        }
        if self.system && is_text && billing {
            return Ok(());
        }
        if has_rest {
            d.rest = Some(rest);
        }
        d.emit(self.out);
        Ok(())
    }
}

enum Key {
    CacheControl,
    Type,
    Text,
    Other,
}

/// Classifies an object key; keys other than `cache_control` (and, when
/// `special`, `type` and `text`) are fed to `h`.
struct KeySeed<'h> {
    h: &'h mut Sha256,
    special: bool,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Key;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Key, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = Key;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Key, E> {
        Ok(match v {
            "cache_control" => Key::CacheControl,
            "type" if self.special => Key::Type,
            "text" if self.special => Key::Text,
            _ => {
                self.h.update(b"k");
                feed_str(self.h, v);
                Key::Other
            }
        })
    }
}

/// What a `type` or `text` value turned out to be.
struct StrFacts {
    is_text: bool,
    billing: bool,
}

struct StrSeed<'h> {
    h: &'h mut Sha256,
}

impl<'de> DeserializeSeed<'de> for StrSeed<'_> {
    type Value = StrFacts;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<StrFacts, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for StrSeed<'_> {
    type Value = StrFacts;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<StrFacts, E> {
        feed_str(self.h, v);
        Ok(StrFacts {
            is_text: v == "text",
            billing: v.starts_with(BILLING_PREFIX),
        })
    }
}

/// Any JSON value, canonically: tagged, strings by decoded content, objects
/// in their order without `cache_control` keys (at any depth).
struct Canon<'h> {
    h: &'h mut Sha256,
    depth: u8,
}

impl<'de> DeserializeSeed<'de> for Canon<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Canon<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        self.h.update(b"z");
        Ok(())
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<(), E> {
        self.h.update(if v { b"t" } else { b"f" });
        Ok(())
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        self.h.update(b"u");
        self.h.update(v.to_le_bytes());
        Ok(())
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        self.h.update(b"i");
        self.h.update(v.to_le_bytes());
        Ok(())
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        self.h.update(b"d");
        self.h.update(v.to_bits().to_le_bytes());
        Ok(())
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        self.h.update(b"s");
        feed_str(self.h, v);
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Canon { h, depth } = self;
        if depth >= MAX_DEPTH {
            return Err(A::Error::custom("too deep"));
        }
        h.update(b"[");
        while seq
            .next_element_seed(Canon {
                h: &mut *h,
                depth: depth + 1,
            })?
            .is_some()
        {}
        h.update(b"]");
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Canon { h, depth } = self;
        if depth >= MAX_DEPTH {
            return Err(A::Error::custom("too deep"));
        }
        h.update(b"{");
        while let Some(key) = map.next_key_seed(KeySeed {
            h: &mut *h,
            special: false,
        })? {
            match key {
                Key::CacheControl => {
                    map.next_value::<IgnoredAny>()?;
                }
                _ => map.next_value_seed(Canon {
                    h: &mut *h,
                    depth: depth + 1,
                })?,
            }
        }
        h.update(b"}");
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Where sessions are remembered.

/// Where sessions are remembered. In memory today; a shared (Redis)
/// implementation for distributed mode implements this same trait.
#[async_trait::async_trait]
pub trait SessionStore: Send + Sync {
    /// The account the session is bound to, if the binding is alive; renews its TTL on use.
    async fn get(&self, key: &str) -> Option<String>;
    /// Binds (or rebinds) the session to `account_id` for the TTL.
    async fn bind(&self, key: &str, account_id: &str);
}

pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
pub const DEFAULT_MAX_ENTRIES: usize = 1_000_000;
/// TTLs are capped so that `now + ttl` cannot overflow.
const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const MAX_SHARDS: usize = 16;
/// Shards are only split off while each keeps at least this many entries.
const MIN_PER_SHARD: usize = 1024;

/// One shard of [`MemorySessions`].
type Shard = Mutex<HashMap<Box<str>, Binding>>;

struct Binding {
    account: Box<str>,
    /// Last bound or looked up: it expires `ttl` (as set now) after this.
    used: Instant,
}

/// In-process [`SessionStore`]: a TTL (renewed on every `get`) and a hard
/// bound on the number of entries, spread over up to 16 mutex-guarded shards
/// (each lock is held for one map operation, never across an await).
///
/// When a shard is full, an insertion first drops its expired entries, then,
/// if still full, the eighth of them that expire soonest (that is, the least
/// recently used): a sweep costs O(shard size) but happens at most once per
/// eighth of a shard's inserts, so the cost per insert stays O(1) amortised.
/// Expired entries are otherwise removed when looked up. At the default
/// million entries, expect roughly 150 MB at capacity.
pub struct MemorySessions {
    /// Milliseconds; follows `sticky.ttl_ms` ([`MemorySessions::set_ttl`]), for every binding.
    ttl_ms: std::sync::atomic::AtomicU64,
    per_shard: usize,
    shards: Box<[Shard]>,
    pick: RandomState,
}

impl Default for MemorySessions {
    fn default() -> Self {
        Self::new(DEFAULT_TTL, DEFAULT_MAX_ENTRIES)
    }
}

impl fmt::Debug for MemorySessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemorySessions")
            .field("ttl", &self.ttl())
            .field("shards", &self.shards.len())
            .field("per_shard", &self.per_shard)
            .finish_non_exhaustive()
    }
}

impl MemorySessions {
    /// At most `max_entries` bindings (at least one), each alive for `ttl` after its last use.
    pub fn new(ttl: Duration, max_entries: usize) -> Self {
        let max_entries = max_entries.max(1);
        let mut n = MAX_SHARDS;
        while n > 1 && max_entries / n < MIN_PER_SHARD {
            n /= 2;
        }
        Self {
            ttl_ms: std::sync::atomic::AtomicU64::new(ttl.min(MAX_TTL).as_millis() as u64),
            per_shard: max_entries / n,
            shards: (0..n).map(|_| Mutex::new(HashMap::new())).collect(),
            pick: RandomState::new(),
        }
    }

    /// Bindings held, including expired ones not swept yet.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, key: &str) -> &Shard {
        let i = (self.pick.hash_one(key) as usize) & (self.shards.len() - 1);
        &self.shards[i]
    }

    /// How long a binding lives after its last use.
    pub fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Applies `sticky.ttl_ms`: to every binding, the ones made before too.
    pub fn set_ttl(&self, ttl: Duration) {
        self.ttl_ms.store(
            ttl.min(MAX_TTL).as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    fn expires(&self, b: &Binding) -> Instant {
        b.used.checked_add(self.ttl()).unwrap_or(b.used)
    }

    fn get_at(&self, key: &str, now: Instant) -> Option<String> {
        let mut map = lock(self.shard(key));
        let alive = map.get(key).map(|b| self.expires(b) > now);
        match (map.get_mut(key), alive) {
            (Some(b), Some(true)) => {
                b.used = now;
                Some(b.account.to_string())
            }
            (Some(_), _) => {
                map.remove(key);
                None
            }
            (None, _) => None,
        }
    }

    fn bind_at(&self, key: &str, account_id: &str, now: Instant) {
        let mut map = lock(self.shard(key));
        if let Some(b) = map.get_mut(key) {
            if &*b.account != account_id {
                b.account = account_id.into();
            }
            b.used = now;
            return;
        }
        if map.len() >= self.per_shard {
            self.make_room(&mut map, now);
        }
        map.insert(
            key.into(),
            Binding {
                account: account_id.into(),
                used: now,
            },
        );
    }

    /// Expired entries first; then, if still full, the soonest-expiring eighth.
    fn make_room(&self, map: &mut HashMap<Box<str>, Binding>, now: Instant) {
        let before = map.len();
        let ttl = self.ttl();
        map.retain(|_, b| b.used.checked_add(ttl).unwrap_or(b.used) > now);
        if map.len() >= self.per_shard {
            let n = (self.per_shard / 8).max(1);
            if n >= map.len() {
                map.clear();
            } else {
                // The same TTL for all: the least recently used go first.
                let mut used: Vec<Instant> = map.values().map(|b| b.used).collect();
                let (_, &mut cut, _) = used.select_nth_unstable(n - 1);
                map.retain(|_, b| b.used > cut);
            }
            metrics::counter!(relay_proto::metrics::STICKY_EVICTIONS_TOTAL).increment((before - map.len()) as u64);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[async_trait::async_trait]
impl SessionStore for MemorySessions {
    async fn get(&self, key: &str) -> Option<String> {
        self.get_at(key, Instant::now())
    }

    async fn bind(&self, key: &str, account_id: &str) {
        self.bind_at(key, account_id, Instant::now())
    }
}

/// Sessions shared by the fleet: in Redis while it answers (so a conversation whose turns land
/// on different data planes stays on one account), in this process while it does not. Every
/// binding is also kept in process, so the fallback starts warm.
pub struct FleetSessions {
    pub local: std::sync::Arc<MemorySessions>,
    pub limiter: std::sync::Arc<relay_limits::Limiter>,
}

#[async_trait::async_trait]
impl SessionStore for FleetSessions {
    async fn get(&self, key: &str) -> Option<String> {
        if let Some(shared) = self.limiter.shared_store() {
            match shared.session_get(key, self.local.ttl()).await {
                Ok(Some(account)) => return Some(account),
                Ok(None) => return None,
                Err(e) => self.limiter.store_failed(&e),
            }
        }
        self.local.get(key).await
    }

    async fn bind(&self, key: &str, account_id: &str) {
        self.local.bind(key, account_id).await;
        if let Some(shared) = self.limiter.shared_store() {
            if let Err(e) = shared.session_bind(key, account_id, self.local.ttl()).await {
                self.limiter.store_failed(&e);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use serde_json::json;

    const UUID_S: &str = "0b8e5b3e-8a42-4a8e-9a57-4b6f3d1c2e10";
    const UUID_A: &str = "7d1f4c2a-1b3e-4f5a-8c9d-0e1f2a3b4c5d";
    const HEX64: &str = "3f9a1c0e5b7d2f4a6c8e0a2b4d6f8a1c3e5b7d9f0a2c4e6a8b0d2f4a6c8e0a2b";

    fn key(headers: &[(&str, &str)], body: &serde_json::Value) -> Option<String> {
        let mut h = http::HeaderMap::new();
        for (k, v) in headers {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        session_key(&h, body.to_string().as_bytes())
    }

    fn body_with_user_id(user_id: &str) -> serde_json::Value {
        json!({
            "model": "claude-sonnet-4-5",
            "metadata": {"user_id": user_id},
            "messages": [{"role": "user", "content": "hello"}],
        })
    }

    #[test]
    fn header_wins_then_metadata_then_content() {
        let old = format!("user_{HEX64}_account_{UUID_A}_session_{UUID_S}");
        let body = body_with_user_id(&old);
        assert_eq!(
            key(&[("X-Claude-Code-Session-Id", "hdr-session")], &body).unwrap(),
            "h:hdr-session"
        );
        // The header needs no body at all.
        let mut h = http::HeaderMap::new();
        h.insert(SESSION_HEADER, http::HeaderValue::from_static(UUID_S));
        assert_eq!(session_key(&h, b"not json").unwrap(), format!("h:{UUID_S}"));

        assert_eq!(key(&[], &body).unwrap(), format!("m:{UUID_S}"));
        // An empty header falls through.
        assert_eq!(key(&[(SESSION_HEADER, " ")], &body).unwrap(), format!("m:{UUID_S}"));

        let plain = json!({"messages": [{"role": "user", "content": "hello"}]});
        let c = key(&[], &plain).unwrap();
        assert!(c.starts_with("c:") && c.len() == 34, "{c}");
        assert!(c[2..].bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn both_metadata_formats() {
        let old = format!("user_{HEX64}_account_{UUID_A}_session_{UUID_S}");
        assert_eq!(key(&[], &body_with_user_id(&old)).unwrap(), format!("m:{UUID_S}"));
        // Older versions without an account uuid.
        let no_account = format!("user_{HEX64}_account__session_{UUID_S}");
        assert_eq!(
            key(&[], &body_with_user_id(&no_account)).unwrap(),
            format!("m:{UUID_S}")
        );

        let new = format!(r#"{{"device_id":"{HEX64}","account_uuid":"{UUID_A}","session_id":"{UUID_S}"}}"#);
        let body = body_with_user_id(&new);
        assert!(body.to_string().contains(r#""{\"device_id\":"#), "a JSON string value");
        assert_eq!(key(&[], &body).unwrap(), format!("m:{UUID_S}"));

        // An app's own user id is not a session: content key.
        let other = key(&[], &body_with_user_id("customer-42")).unwrap();
        assert!(other.starts_with("c:"), "{other}");
        let no_session = json!({"device_id": HEX64, "account_uuid": UUID_A}).to_string();
        assert!(key(&[], &body_with_user_id(&no_session)).unwrap().starts_with("c:"));
        // Metadata of the wrong shape is ignored, not fatal.
        let odd = json!({"metadata": {"user_id": 7}, "messages": [{"role": "user", "content": "hello"}]});
        assert!(key(&[], &odd).unwrap().starts_with("c:"));
        let odd = json!({"metadata": null, "messages": [{"role": "user", "content": "hello"}]});
        assert!(key(&[], &odd).unwrap().starts_with("c:"));
    }

    #[test]
    fn long_or_odd_values_are_hashed() {
        let long = "x".repeat(200);
        let k = key(&[(SESSION_HEADER, &long)], &json!({})).unwrap();
        assert_eq!(k.len(), 2 + 32);
        assert!(k.starts_with("h:"));
        let spaced = key(&[(SESSION_HEADER, "a b")], &json!({})).unwrap();
        assert_eq!(spaced.len(), 34);
        assert_ne!(spaced, key(&[(SESSION_HEADER, "a  b")], &json!({})).unwrap());
        // Non-ASCII header bytes are hashed, not dropped.
        let mut h = http::HeaderMap::new();
        h.insert(SESSION_HEADER, http::HeaderValue::from_bytes(b"caf\xe9").unwrap());
        let k = session_key(&h, b"").unwrap();
        assert!(k.starts_with("h:") && k.len() == 34, "{k}");
    }

    fn cc() -> serde_json::Value {
        json!({"type": "ephemeral"})
    }

    #[test]
    fn content_key_is_stable_across_turns() {
        let turn1 = json!({
            "model": "claude-sonnet-4-5",
            "system": "You are a careful assistant.",
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Fix the bug in main.rs", "cache_control": cc()}]}
            ],
        });
        let turn3 = json!({
            "model": "claude-sonnet-4-5",
            "system": [{"type": "text", "text": "You are a careful assistant.", "cache_control": cc()}],
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Fix the bug in main.rs"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Done."}]},
                {"role": "user", "content": [{"type": "text", "text": "Thanks, now tests", "cache_control": cc()}]}
            ],
        });
        let string_content = json!({
            "system": [{"text": "You are a careful assistant.", "type": "text"}],
            "messages": [
                {"role": "user", "content": "Fix the bug in main.rs"},
                {"role": "assistant", "content": "Done."}
            ],
        });
        let k1 = key(&[], &turn1).unwrap();
        assert!(k1.starts_with("c:"));
        assert_eq!(k1, key(&[], &turn3).unwrap());
        assert_eq!(k1, key(&[], &string_content).unwrap());

        // Escapes decode to the same text.
        let escaped = br#"{"system":"You are a careful \u0061ssistant.","messages":[{"role":"user","content":"Fix the bug in main.rs"}]}"#;
        assert_eq!(session_key(&http::HeaderMap::new(), escaped).unwrap(), k1);

        // A different first message or system gives a different key.
        let mut other = turn1.clone();
        other["messages"][0]["content"][0]["text"] = json!("Fix the bug in lib.rs");
        assert_ne!(k1, key(&[], &other).unwrap());
        let mut other = turn1.clone();
        other["system"] = json!("You are a hasty assistant.");
        assert_ne!(k1, key(&[], &other).unwrap());
        let mut no_system = turn1.clone();
        no_system.as_object_mut().unwrap().remove("system");
        assert_ne!(k1, key(&[], &no_system).unwrap());
        // Same texts split differently are different prompts.
        let mut split = turn1.clone();
        split["messages"][0]["content"] =
            json!([{"type": "text", "text": "Fix the bug"}, {"type": "text", "text": " in main.rs"}]);
        assert_ne!(k1, key(&[], &split).unwrap());
    }

    #[test]
    fn cache_control_is_ignored_at_any_depth_and_in_any_block() {
        let a = json!({"messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}, "cache_control": cc()},
            {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "out", "cache_control": cc()}]},
            {"type": "text", "text": "What is this?"}
        ]}]});
        let b = json!({"messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
            {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "out"}]},
            {"type": "text", "text": "What is this?", "cache_control": cc()}
        ]}]});
        assert_eq!(key(&[], &a).unwrap(), key(&[], &b).unwrap());
        let mut c = b.clone();
        c["messages"][0]["content"][0]["source"]["data"] = json!("R0lGODlh");
        assert_ne!(key(&[], &b).unwrap(), key(&[], &c).unwrap());
    }

    #[test]
    fn billing_header_block_is_not_part_of_the_prompt() {
        let with = |billing: &str| {
            json!({
                "system": [
                    {"type": "text", "text": format!("x-anthropic-billing-header: cc_version=2.1.3; cch={billing};")},
                    {"type": "text", "text": "You are Claude Code.", "cache_control": cc()}
                ],
                "messages": [{"role": "user", "content": "hi"}],
            })
        };
        let plain = json!({"system": "You are Claude Code.", "messages": [{"role": "user", "content": "hi"}]});
        assert_eq!(key(&[], &with("aaaa")).unwrap(), key(&[], &with("bbbb")).unwrap());
        assert_eq!(key(&[], &with("aaaa")).unwrap(), key(&[], &plain).unwrap());
    }

    #[test]
    fn first_user_message_is_used() {
        let a = json!({"messages": [
            {"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}, {"role": "user", "content": "three"}
        ]});
        let b = json!({"messages": [{"role": "user", "content": "one"}]});
        assert_eq!(key(&[], &a).unwrap(), key(&[], &b).unwrap());
        let long_a = json!({"messages": [{"role": "user", "content": "a".repeat(20_000)}]});
        let long_b = json!({"messages": [{"role": "user", "content": "a".repeat(20_001)}]});
        assert_ne!(key(&[], &long_a).unwrap(), key(&[], &long_b).unwrap());
    }

    #[test]
    fn no_key_without_messages_or_json() {
        let h = http::HeaderMap::new();
        assert_eq!(session_key(&h, b"{not json"), None);
        assert_eq!(session_key(&h, b""), None);
        assert_eq!(session_key(&h, b"[]"), None);
        assert_eq!(key(&[], &json!({"model": "m"})), None);
        assert_eq!(key(&[], &json!({"messages": []})), None);
        assert_eq!(key(&[], &json!({"messages": null})), None);
        assert_eq!(
            key(&[], &json!({"messages": [{"role": "assistant", "content": "x"}]})),
            None
        );
        assert_eq!(key(&[], &json!({"messages": [{"role": "user"}]})), None);
        assert_eq!(key(&[], &json!({"messages": "hello"})), None);
        let mut deep = String::from("{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"x\",\"v\":");
        deep.push_str(&"[".repeat(100));
        deep.push_str(&"]".repeat(100));
        deep.push_str("}]}]}");
        assert_eq!(session_key(&h, deep.as_bytes()), None);
    }

    #[test]
    fn a_new_ttl_applies_to_bindings_made_before() {
        let store = MemorySessions::new(Duration::from_secs(3600), 100);
        let t0 = Instant::now();
        store.bind_at("s", "acct-a", t0);
        assert_eq!(
            store.get_at("s", t0 + Duration::from_secs(60)).as_deref(),
            Some("acct-a")
        );
        // sticky.ttl_ms set to 1 ms: the binding, last used a minute ago, is gone.
        store.set_ttl(Duration::from_millis(1));
        assert_eq!(store.get_at("s", t0 + Duration::from_secs(61)), None);
    }

    #[test]
    fn ttl_expiry_and_renewal() {
        let s = MemorySessions::new(Duration::from_secs(10), 100);
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        s.bind_at("k", "acct-1", at(0));
        assert_eq!(
            s.get_at("k", at(9)).as_deref(),
            Some("acct-1"),
            "alive, and renewed to 19 s"
        );
        assert_eq!(
            s.get_at("k", at(18)).as_deref(),
            Some("acct-1"),
            "renewed again to 28 s"
        );
        assert_eq!(s.get_at("k", at(29)), None, "expired");
        assert_eq!(s.len(), 0, "an expired binding is dropped when looked up");

        s.bind_at("k", "acct-1", at(30));
        s.bind_at("k", "acct-2", at(35));
        assert_eq!(s.get_at("k", at(44)).as_deref(), Some("acct-2"), "rebinding renews too");
        assert_eq!(s.len(), 1);
        assert_eq!(s.get_at("missing", at(44)), None);
    }

    #[test]
    fn bounded_evicting_expired_first_then_oldest() {
        let s = MemorySessions::new(Duration::from_secs(100), 10);
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        for i in 0..10 {
            let t = if i < 5 { i } else { 45 + i };
            s.bind_at(&format!("k{i}"), "a", at(t));
        }
        assert_eq!(s.len(), 10);
        // k0..k4 expire at 100..104, k5..k9 at 150..154: at 104 the next
        // insert sweeps the first five only.
        s.bind_at("new", "a", at(104));
        assert_eq!(s.len(), 6);
        assert!(s.get_at("k0", at(104)).is_none());
        assert!(s.get_at("k5", at(104)).is_some(), "renewed: now expires at 204");
        for i in 0..4 {
            s.bind_at(&format!("m{i}"), "a", at(105 + i));
        }
        assert_eq!(s.len(), 10);
        // Full, nothing expired: the soonest-expiring one goes (k6, at 151).
        s.bind_at("last", "a", at(110));
        assert_eq!(s.len(), 10);
        assert!(s.get_at("k6", at(110)).is_none());
        for k in ["k5", "k7", "k8", "k9", "new", "m0", "m3", "last"] {
            assert!(s.get_at(k, at(110)).is_some(), "{k}");
        }

        // Never more than the bound, however many keys, across shards.
        let big = MemorySessions::new(Duration::from_secs(3600), 20_000);
        assert_eq!(big.shards.len(), 16);
        for i in 0..50_000 {
            big.bind_at(&format!("s{i}"), "a", at(i));
        }
        assert!(big.len() <= 20_000, "{}", big.len());
        assert!(big.len() >= 15_000, "{}", big.len());
        assert!(big.get_at("s49999", at(50_000)).is_some(), "the newest is kept");
        assert!(big.get_at("s0", at(50_000)).is_none(), "the oldest is gone");
    }

    #[tokio::test]
    async fn the_trait_object_works() {
        let store: Box<dyn SessionStore> = Box::new(MemorySessions::default());
        assert_eq!(store.get("s").await, None);
        store.bind("s", "acct").await;
        assert_eq!(store.get("s").await.as_deref(), Some("acct"));
    }
}
