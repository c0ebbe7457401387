//! whipcast's native egress fan-out core (`whipcast.gateway._fanout`).
//!
//! Below `gateway/rtpsend.py`'s unchanged Python interface: a frame's RTP packets are
//! built once per header layout ([`Packets`]); for each viewer track ([`Track`]) one call
//! writes that viewer's sequence numbers, timestamp and SSRC, SRTP-protects every packet
//! (RFC 3711 AES_CM_128_HMAC_SHA1_80, RFC 7714 AEAD_AES_128_GCM / AEAD_AES_256_GCM) and
//! hands them all to the kernel in `sendmmsg` calls (runs of equal-length packets as UDP
//! GSO messages), with the GIL released. The output is byte for byte what libsrtp
//! (aiortc's SRTP) makes of the same packets; the pure-Python path in `rtpsend.py` is
//! the reference and the fallback. [`send_batch`] does that for a whole list of tracks
//! (all viewers of a layout) in one call; each track keeps its sequence number,
//! counters and NACK history itself, so a batch needs no Python per viewer. Every
//! packet's per-viewer header bytes are written in one place, [`write_packet`].
//!
//! A [`Track`] owns the SRTP state (rollover counter) and the SRTCP index of one media
//! SSRC alone: no other context may protect RTP or RTCP of that SSRC. It builds its
//! sender reports itself; [`send_reports`] sends the due ones of many tracks in one
//! call. RTX stays in aiortc's libsrtp session, under its own SSRC.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use aes::cipher::{KeyIvInit, StreamCipher};
use aes::{Aes128, Aes256};
use aes_gcm::aead::generic_array::GenericArray;
use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes128Gcm, Aes256Gcm, KeyInit, Nonce};
use hmac::{Hmac, Mac};
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};
use sha1::Sha1;

type Aes128Ctr = ctr::Ctr128BE<Aes128>;
type Aes256Ctr = ctr::Ctr128BE<Aes256>;

/// libsrtp's replay window on the sending side (aiortc sets 1024): a packet further
/// back than this from the newest index is refused, as libsrtp refuses it.
const WINDOW: i64 = 1024;
const SEQ_MEDIAN: i64 = 1 << 15;
const SEQ_MAX: i64 = 1 << 16;
/// Packets handed to one `sendmmsg` call at most (the kernel's UIO_MAXIOV is 1024).
const BATCH: usize = 64;

/// Profile names as OpenSSL's DTLS-SRTP extension spells them.
const CM_SHA1_80: &str = "SRTP_AES128_CM_SHA1_80";
const GCM_128: &str = "SRTP_AEAD_AES_128_GCM";
const GCM_256: &str = "SRTP_AEAD_AES_256_GCM";

enum Cipher {
    CmSha1 {
        key: [u8; 16],
        salt: [u8; 14],
        auth: Hmac<Sha1>,
    },
    Gcm128 {
        aead: Box<Aes128Gcm>,
        salt: [u8; 12],
    },
    Gcm256 {
        aead: Box<Aes256Gcm>,
        salt: [u8; 12],
    },
}

/// RFC 3711 section 4.3 key derivation (AES-CM PRF, key derivation rate 0), as libsrtp
/// does it for every profile: GCM's 96-bit master salt is zero-padded to 112 bits.
fn derive(master_key: &[u8], master_salt: &[u8], label: u8, out: &mut [u8]) {
    let mut iv = [0u8; 16];
    iv[..master_salt.len()].copy_from_slice(master_salt);
    iv[7] ^= label;
    out.fill(0);
    if master_key.len() == 32 {
        Aes256Ctr::new(master_key.into(), &iv.into()).apply_keystream(out);
    } else {
        Aes128Ctr::new(master_key.into(), &iv.into()).apply_keystream(out);
    }
}

impl Cipher {
    /// The SRTP (`rtcp` false) or SRTCP (`rtcp` true: labels 3-5 of RFC 3711 section
    /// 4.3.2) session keys of one direction.
    fn new(profile: &str, key_salt: &[u8], rtcp: bool) -> Result<Self, String> {
        let label = if rtcp { 3 } else { 0 };
        let (key_len, salt_len) = match profile {
            CM_SHA1_80 => (16, 14),
            GCM_128 => (16, 12),
            GCM_256 => (32, 12),
            other => return Err(format!("unsupported SRTP profile {other}")),
        };
        if key_salt.len() != key_len + salt_len {
            return Err(format!(
                "{profile} needs {} bytes of key and salt",
                key_len + salt_len
            ));
        }
        let (master_key, master_salt) = key_salt.split_at(key_len);
        Ok(match profile {
            CM_SHA1_80 => {
                let (mut key, mut salt, mut auth) = ([0u8; 16], [0u8; 14], [0u8; 20]);
                derive(master_key, master_salt, label, &mut key);
                derive(master_key, master_salt, label + 1, &mut auth);
                derive(master_key, master_salt, label + 2, &mut salt);
                let auth = <Hmac<Sha1> as Mac>::new_from_slice(&auth).expect("any key length");
                Cipher::CmSha1 { key, salt, auth }
            }
            GCM_128 => {
                let (mut key, mut salt) = ([0u8; 16], [0u8; 12]);
                derive(master_key, master_salt, label, &mut key);
                derive(master_key, master_salt, label + 2, &mut salt);
                Cipher::Gcm128 {
                    aead: Box::new(Aes128Gcm::new(&key.into())),
                    salt,
                }
            }
            _ => {
                let (mut key, mut salt) = ([0u8; 32], [0u8; 12]);
                derive(master_key, master_salt, label, &mut key);
                derive(master_key, master_salt, label + 2, &mut salt);
                Cipher::Gcm256 {
                    aead: Box::new(Aes256Gcm::new(&key.into())),
                    salt,
                }
            }
        })
    }

    fn tag_len(&self) -> usize {
        match self {
            Cipher::CmSha1 { .. } => 10,
            _ => 16,
        }
    }

    /// Protect one RTP packet in place: `buf` holds it, followed by `tag_len` spare bytes.
    fn protect(&self, buf: &mut [u8], header_len: usize, ssrc: u32, index: u64) {
        let roc = (index >> 16) as u32;
        let seq = index as u16;
        let body_end = buf.len() - self.tag_len();
        match self {
            Cipher::CmSha1 { key, salt, auth } => {
                let mut iv = [0u8; 16];
                iv[..14].copy_from_slice(salt);
                for (i, b) in ssrc.to_be_bytes().iter().enumerate() {
                    iv[4 + i] ^= b;
                }
                for (i, b) in index.to_be_bytes()[2..].iter().enumerate() {
                    iv[8 + i] ^= b;
                }
                Aes128Ctr::new(key.into(), &iv.into())
                    .apply_keystream(&mut buf[header_len..body_end]);
                let mut mac = auth.clone();
                mac.update(&buf[..body_end]);
                mac.update(&roc.to_be_bytes());
                let tag = mac.finalize().into_bytes();
                buf[body_end..].copy_from_slice(&tag[..10]);
            }
            Cipher::Gcm128 { aead, salt } => {
                let nonce = gcm_iv(salt, ssrc, roc, seq);
                let (head, rest) = buf.split_at_mut(header_len);
                let (body, tag_out) = rest.split_at_mut(body_end - header_len);
                let tag = aead
                    .encrypt_in_place_detached(Nonce::from_slice(&nonce), head, body)
                    .expect("packet within GCM limits");
                tag_out.copy_from_slice(&tag);
            }
            Cipher::Gcm256 { aead, salt } => {
                let nonce = gcm_iv(salt, ssrc, roc, seq);
                let (head, rest) = buf.split_at_mut(header_len);
                let (body, tag_out) = rest.split_at_mut(body_end - header_len);
                let tag = aead
                    .encrypt_in_place_detached(Nonce::from_slice(&nonce), head, body)
                    .expect("packet within GCM limits");
                tag_out.copy_from_slice(&tag);
            }
        }
    }
}

impl Cipher {
    /// SRTCP-protect one compound RTCP packet in place (`buf` holds it; the trailer
    /// is appended): everything past the first 8 bytes (header and sender SSRC)
    /// encrypted, then the E flag and 31-bit SRTCP `index` (RFC 3711 section 3.4);
    /// AES-CM appends the HMAC-SHA1-80 tag over all that, GCM puts its tag before the
    /// index and takes the first 8 bytes and the index as AAD (RFC 7714 section 9).
    fn protect_rtcp(&self, buf: &mut Vec<u8>, ssrc: u32, index: u32) {
        let trailer = (0x8000_0000 | index).to_be_bytes();
        match self {
            Cipher::CmSha1 { key, salt, auth } => {
                let mut iv = [0u8; 16];
                iv[..14].copy_from_slice(salt);
                for (i, b) in ssrc.to_be_bytes().iter().enumerate() {
                    iv[4 + i] ^= b;
                }
                for (i, b) in index.to_be_bytes().iter().enumerate() {
                    iv[10 + i] ^= b;
                }
                Aes128Ctr::new(key.into(), &iv.into()).apply_keystream(&mut buf[8..]);
                buf.extend_from_slice(&trailer);
                let mut mac = auth.clone();
                mac.update(buf);
                let tag = mac.finalize().into_bytes();
                buf.extend_from_slice(&tag[..10]);
            }
            Cipher::Gcm128 { aead, salt } => {
                let nonce = gcm_rtcp_iv(salt, ssrc, index);
                let tag = gcm_rtcp(aead.as_ref(), &nonce, buf, &trailer);
                buf.extend_from_slice(&tag);
                buf.extend_from_slice(&trailer);
            }
            Cipher::Gcm256 { aead, salt } => {
                let nonce = gcm_rtcp_iv(salt, ssrc, index);
                let tag = gcm_rtcp(aead.as_ref(), &nonce, buf, &trailer);
                buf.extend_from_slice(&tag);
                buf.extend_from_slice(&trailer);
            }
        }
    }
}

/// RFC 7714 section 9.1: (00 00 || SSRC || 00 00 || 0 || SRTCP index) XOR salt.
fn gcm_rtcp_iv(salt: &[u8; 12], ssrc: u32, index: u32) -> [u8; 12] {
    let mut iv = [0u8; 12];
    iv[2..6].copy_from_slice(&ssrc.to_be_bytes());
    iv[8..12].copy_from_slice(&(index & 0x7FFF_FFFF).to_be_bytes());
    for (v, s) in iv.iter_mut().zip(salt) {
        *v ^= s;
    }
    iv
}

/// Encrypt `buf[8..]` in place; the AAD is the first 8 bytes and the trailer.
fn gcm_rtcp<A: AeadInPlace>(
    aead: &A,
    nonce: &[u8; 12],
    buf: &mut [u8],
    trailer: &[u8; 4],
) -> Vec<u8> {
    let (head, body) = buf.split_at_mut(8);
    let mut aad = [0u8; 12];
    aad[..8].copy_from_slice(head);
    aad[8..].copy_from_slice(trailer);
    aead.encrypt_in_place_detached(GenericArray::from_slice(nonce), &aad, body)
        .expect("report within GCM limits")
        .to_vec()
}

/// RFC 7714 section 8.1: (00 00 || SSRC || ROC || SEQ) XOR salt.
fn gcm_iv(salt: &[u8; 12], ssrc: u32, roc: u32, seq: u16) -> [u8; 12] {
    let mut iv = [0u8; 12];
    iv[2..6].copy_from_slice(&ssrc.to_be_bytes());
    iv[6..10].copy_from_slice(&roc.to_be_bytes());
    iv[10..12].copy_from_slice(&seq.to_be_bytes());
    for (v, s) in iv.iter_mut().zip(salt) {
        *v ^= s;
    }
    iv
}

/// Length of an RTP header with its CSRCs and extension, or None if `p` is too short.
fn header_len(p: &[u8]) -> Option<usize> {
    (p.len() >= 12)
        .then(|| header_tail_len(p[0], &p[12..]))?
        .map(|t| 12 + t)
}

/// Length past byte 12 of a header whose first byte is `first` (CSRCs, extension),
/// read from `rest` = the packet from byte 12 on; None if `rest` is too short.
fn header_tail_len(first: u8, rest: &[u8]) -> Option<usize> {
    let mut len = 4 * (first & 0x0F) as usize;
    if first & 0x10 != 0 {
        let words = rest.get(len + 2..len + 4)?;
        len += 4 + 4 * u16::from_be_bytes([words[0], words[1]]) as usize;
    }
    (len <= rest.len()).then_some(len)
}

/// The sender's packet index for a sequence number, as libsrtp estimates it
/// (`srtp_rdbx_estimate_index`): (guessed 48-bit index, distance from the newest).
fn estimate(newest: u64, seq: u16) -> (u64, i64) {
    let s = seq as i64;
    if newest as i64 <= SEQ_MEDIAN {
        return (s as u64, s - (newest as u16) as i64);
    }
    let roc = (newest >> 16) as i64;
    let local = (newest as u16) as i64;
    let (guess_roc, delta) = if local < SEQ_MEDIAN {
        if s - local > SEQ_MEDIAN {
            (roc - 1, s - local - SEQ_MAX)
        } else {
            (roc, s - local)
        }
    } else if local - SEQ_MEDIAN > s {
        (roc + 1, s - local + SEQ_MAX)
    } else {
        (roc, s - local)
    };
    ((((guess_roc as u64) & 0xFFFF_FFFF) << 16) | s as u64, delta)
}

/// A frame's RTP packets for one header layout, shared by the viewers that use it:
/// per packet its first two header bytes, then (after the 10 bytes a viewer fills in:
/// sequence number, timestamp, SSRC) the rest of the header and the payload, with a
/// 3-byte hole for the abs-send-time value where the layout has one.
#[pyclass(frozen, module = "whipcast.gateway._fanout")]
struct Packets {
    data: Arc<Data>,
}

/// What [`Packets`] holds; shared with the send histories of the tracks it went to.
struct Data {
    heads: Vec<[u8; 2]>,
    /// Where each packet's rest starts in `data`, and one past the last.
    bounds: Vec<usize>,
    data: Vec<u8>,
    /// Length of the header past byte 12 (CSRCs and extension), alike for all packets.
    header_tail: usize,
    /// Where the abs-send-time hole lies in each packet's rest (alike for all packets).
    abs_send_time_at: Option<usize>,
    /// Where the 2-byte transport-wide sequence number lies in each packet's rest.
    transport_cc_at: Option<usize>,
}

#[pymethods]
impl Packets {
    /// `packets`: `(bytes 0-1, bytes 12-end)` pairs, or `(bytes 0-1, before, after)`
    /// triples as `PreparedFrame.packets` makes them (joined; with `abs_send_time`, a
    /// 3-byte abs-send-time hole goes between them, at the same place in every packet,
    /// which each send fills in). With `transport_cc` (the extension's id), its element
    /// (id byte, then a 2-byte hole for the transport-wide sequence number) follows, at
    /// the same place. Every packet must have the same header length.
    #[new]
    #[pyo3(signature = (packets, abs_send_time = false, transport_cc = None))]
    fn new(
        packets: &Bound<'_, PyList>,
        abs_send_time: bool,
        transport_cc: Option<u8>,
    ) -> PyResult<Self> {
        let mut heads = Vec::with_capacity(packets.len());
        let mut bounds = Vec::with_capacity(packets.len() + 1);
        let mut data = Vec::new();
        let mut header_tail = None;
        let mut hole_at = None;
        let mut twcc_at = None;
        for item in packets.iter() {
            let parts = item.downcast::<PyTuple>()?;
            let head = parts.get_item(0)?;
            let head: &[u8] = head.downcast::<PyBytes>()?.as_bytes();
            if head.len() != 2 {
                return Err(PyValueError::new_err("a packet's head is RTP bytes 0-1"));
            }
            let start = data.len();
            match parts.len() {
                2 if !abs_send_time && transport_cc.is_none() => {
                    data.extend_from_slice(parts.get_item(1)?.downcast::<PyBytes>()?.as_bytes())
                }
                3 => {
                    let before = parts.get_item(1)?;
                    let before: &[u8] = before.downcast::<PyBytes>()?.as_bytes();
                    data.extend_from_slice(before);
                    if abs_send_time {
                        if *hole_at.get_or_insert(before.len()) != before.len() {
                            return Err(PyValueError::new_err(
                                "abs-send-time lies at one place in every packet",
                            ));
                        }
                        data.extend_from_slice(&[0u8; 3]);
                    }
                    if let Some(id) = transport_cc {
                        let at = data.len() - start + 1;
                        if *twcc_at.get_or_insert(at) != at {
                            return Err(PyValueError::new_err(
                                "transport-cc lies at one place in every packet",
                            ));
                        }
                        data.extend_from_slice(&[(id << 4) | 1, 0, 0]);
                    }
                    data.extend_from_slice(parts.get_item(2)?.downcast::<PyBytes>()?.as_bytes());
                }
                _ => {
                    return Err(PyValueError::new_err(
                        "a packet is (head, rest) or (head, before, after)",
                    ))
                }
            }
            let tail = header_tail_len(head[0], &data[start..])
                .ok_or_else(|| PyValueError::new_err("truncated RTP header"))?;
            if *header_tail.get_or_insert(tail) != tail {
                return Err(PyValueError::new_err(
                    "packets of one layout share a header",
                ));
            }
            if hole_at.is_some_and(|at| at + 3 > tail) || twcc_at.is_some_and(|at| at + 2 > tail) {
                return Err(PyValueError::new_err(
                    "abs-send-time lies outside the header",
                ));
            }
            heads.push([head[0], head[1]]);
            bounds.push(start);
        }
        bounds.push(data.len());
        let header_tail = header_tail.unwrap_or(0);
        Ok(Packets {
            data: Arc::new(Data {
                heads,
                bounds,
                data,
                header_tail,
                abs_send_time_at: hole_at,
                transport_cc_at: twcc_at,
            }),
        })
    }

    /// Number of packets.
    #[getter]
    fn count(&self) -> usize {
        self.data.heads.len()
    }

    /// Bytes after the fixed 12-byte headers, summed (what `octets_sent` counts).
    #[getter]
    fn octets(&self) -> usize {
        self.data.data.len()
    }

    /// `octets` of packets `first` up to `end` (a slice, as Python's).
    #[pyo3(signature = (first = 0, end = None))]
    fn octets_of(&self, first: usize, end: Option<usize>) -> usize {
        let (first, end) = self.data.range(first, end);
        self.data.bounds[end] - self.data.bounds[first]
    }

    /// Where the abs-send-time value lies in a packet (from byte 0), or None.
    #[getter]
    fn abs_send_time_at(&self) -> Option<usize> {
        self.data.abs_send_time_at.map(|at| 12 + at)
    }

    /// Where the transport-wide sequence number lies in a packet (from byte 0), or None.
    #[getter]
    fn transport_cc_at(&self) -> Option<usize> {
        self.data.transport_cc_at.map(|at| 12 + at)
    }
}

impl Data {
    /// `first..end` clamped to the packets, as a Python slice with those bounds.
    fn range(&self, first: usize, end: Option<usize>) -> (usize, usize) {
        let end = end.unwrap_or(self.heads.len()).min(self.heads.len());
        (first.min(end), end)
    }
}

/// One frame (or slice) a track sent, kept for NACKs: the packets stay shared.
struct Sent {
    /// Distinct per send of this track (a resend count belongs to one send).
    id: u64,
    seq: u16,
    first: usize,
    count: usize,
    data: Arc<Data>,
    ts: u32,
    /// CLOCK_MONOTONIC seconds (Python's `time.monotonic()`).
    at: f64,
}

/// Sequence numbers a [`SendLog`] remembers (as `gateway/twcc.py`'s `LOG_SIZE`).
const LOG_SIZE: usize = 1 << 13;

struct Ring {
    next: u16,
    /// Per slot: (sequence number or -1, send time µs, size).
    slots: Vec<(i32, u64, u32)>,
}

impl Ring {
    fn take(&mut self, size: u32, now_us: u64) -> u16 {
        let seq = self.next;
        self.slots[seq as usize & (LOG_SIZE - 1)] = (seq as i32, now_us, size);
        self.next = seq.wrapping_add(1);
        seq
    }
}

/// CLOCK_MONOTONIC in µs: Python's `time.monotonic_ns() // 1000`.
fn monotonic_us() -> u64 {
    let mut t: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000 + t.tv_nsec as u64 / 1000
}

/// (NTP time, µs since the Unix epoch) of now, from one CLOCK_REALTIME reading: NTP
/// as aiortc's `clock.current_ntp_time()` computes it.
fn wall_clock() -> (u64, i64) {
    let mut t: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut t) };
    let micros = t.tv_nsec as u64 / 1000;
    let ntp = ((t.tv_sec as u64 + NTP_UNIX_OFFSET) << 32) | ((micros << 32) / 1_000_000);
    (ntp, t.tv_sec as i64 * 1_000_000 + micros as i64)
}

/// Seconds from 1900 (NTP's epoch) to 1970 (Unix's).
const NTP_UNIX_OFFSET: u64 = 2_208_988_800;

/// A uniform number in [0, 1) for report intervals (splitmix64; not for secrets).
fn jitter() -> f64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static STATE: AtomicU64 = AtomicU64::new(0);
    let mut seed = STATE.load(Ordering::Relaxed);
    if seed == 0 {
        seed = monotonic_us() | 1;
    }
    seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    STATE.store(seed, Ordering::Relaxed);
    let mut z = seed;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// One viewer's transport-wide sequence counter and a ring of (send time µs, size)
/// per number (as `twcc.SendLog`): shared by the viewer's tracks, which number and
/// log each packet as they send it; a feedback message is parsed and matched against it
/// in one call ([`SendLog::summarize`]), so feedback costs Python no per-packet work.
#[pyclass(module = "whipcast.gateway._fanout")]
struct SendLog {
    ring: Arc<Mutex<Ring>>,
}

#[pymethods]
impl SendLog {
    #[new]
    fn new() -> Self {
        SendLog {
            ring: Arc::new(Mutex::new(Ring {
                next: 0,
                slots: vec![(-1, 0, 0); LOG_SIZE],
            })),
        }
    }

    /// The number the next packet gets.
    #[getter]
    fn get_next_seq(&self) -> u16 {
        self.ring.lock().unwrap().next
    }

    #[setter]
    fn set_next_seq(&self, seq: u16) {
        self.ring.lock().unwrap().next = seq;
    }

    /// Number one packet of `size` bytes sent at `now_us` (a resend from Python).
    fn take(&self, size: u32, now_us: u64) -> u16 {
        self.ring.lock().unwrap().take(size, now_us)
    }

    /// (send time µs, size) per sequence number, None where forgotten.
    fn lookup(&self, seqs: Vec<u16>) -> Vec<Option<(u64, u32)>> {
        let ring = self.ring.lock().unwrap();
        seqs.iter()
            .map(|&s| {
                let (seq, at, size) = ring.slots[s as usize & (LOG_SIZE - 1)];
                (seq == s as i32).then_some((at, size))
            })
            .collect()
    }

    /// Parse a transport-cc feedback's FCI (the bytes after its two SSRCs) and match
    /// it against the log, in one call: what `twcc.SendLog.summarize` returns, value
    /// for value, as a tuple `(count, lost, acked_bytes, first_arrival_us,
    /// last_arrival_us, last_sent_us)`. Raises ValueError for anything malformed, with
    /// `twcc.parse_feedback`'s reasons.
    #[allow(clippy::type_complexity)]
    fn summarize(
        &self,
        fci: &[u8],
    ) -> PyResult<(u32, u32, u64, Option<i64>, Option<i64>, Option<u64>)> {
        let ring = self.ring.lock().unwrap();
        summarize(fci, &ring).map_err(PyValueError::new_err)
    }
}

/// Receive deltas count quarter milliseconds; the reference time counts 64 ms.
const DELTA_US: i64 = 250;
const REFERENCE_DELTAS: i64 = 64_000 / DELTA_US;

/// [`SendLog::summarize`] (draft-holmer-rmcat-transport-wide-cc-extensions-01
/// section 3.1): the status chunks into runs of one symbol, then the receive deltas of
/// the received packets, each matched against `ring` as it is read.
#[allow(clippy::type_complexity)]
fn summarize(
    fci: &[u8],
    ring: &Ring,
) -> Result<(u32, u32, u64, Option<i64>, Option<i64>, Option<u64>), &'static str> {
    if fci.len() < 8 {
        return Err("transport-cc feedback shorter than its header");
    }
    let base = u16::from_be_bytes([fci[0], fci[1]]);
    let count = u16::from_be_bytes([fci[2], fci[3]]) as usize;
    // 24-bit signed reference time, in 64 ms
    let reference = i32::from_be_bytes([fci[4], fci[5], fci[6], 0]) as i64 >> 8;
    let mut runs: Vec<(u8, usize)> = Vec::with_capacity(8); // (symbol, packets)
    let (mut total, mut at) = (0usize, 8usize);
    while total < count {
        let Some(bytes) = fci.get(at..at + 2) else {
            return Err("transport-cc feedback ends inside its status chunks");
        };
        let chunk = u16::from_be_bytes([bytes[0], bytes[1]]);
        at += 2;
        if chunk & 0x8000 == 0 {
            let symbol = ((chunk >> 13) & 0x3) as u8;
            let run = ((chunk & 0x1FFF) as usize).min(count - total);
            if symbol == 3 {
                return Err("transport-cc feedback has a reserved status");
            }
            runs.push((symbol, run));
            total += run;
        } else {
            let two_bit = chunk & 0x4000 != 0;
            let n = (if two_bit { 7 } else { 14 }).min(count - total);
            for i in 0..n {
                let symbol = if two_bit {
                    ((chunk >> (12 - 2 * i)) & 0x3) as u8
                } else {
                    ((chunk >> (13 - i)) & 0x1) as u8
                };
                if symbol == 3 {
                    return Err("transport-cc feedback has a reserved status");
                }
                runs.push((symbol, 1));
            }
            total += n;
        }
    }
    let mut arrival = reference * REFERENCE_DELTAS; // in receive-delta units
    let (mut received, mut acked) = (0u32, 0u64);
    let (mut first, mut last, mut last_sent) = (None, None, None);
    let mut seq = base;
    for &(symbol, n) in &runs {
        if symbol != 0 {
            let width = symbol as usize; // 1: one-byte deltas, 2: two-byte signed ones
            let Some(deltas) = fci.get(at..at + width * n) else {
                return Err("transport-cc feedback ends inside its deltas");
            };
            at += width * n;
            for i in 0..n {
                arrival += if width == 1 {
                    deltas[i] as i64
                } else {
                    i16::from_be_bytes([deltas[2 * i], deltas[2 * i + 1]]) as i64
                };
                let s = seq.wrapping_add(i as u16);
                let (logged, sent_us, size) = ring.slots[s as usize & (LOG_SIZE - 1)];
                let sent = (logged == s as i32).then_some(sent_us);
                if sent.is_some() {
                    acked += size as u64;
                }
                first.get_or_insert(arrival * DELTA_US);
                last = Some(arrival * DELTA_US);
                last_sent = sent;
            }
            received += n as u32;
        }
        seq = seq.wrapping_add(n as u16);
    }
    Ok((
        count as u32,
        count as u32 - received,
        acked,
        first,
        last,
        last_sent,
    ))
}

/// One viewer track: the SRTP state of its media SSRC, where its packets go, its RTP
/// sequence, what it sent (counters, NACK history) and, for [`send_batch`], whether a
/// batch may send it a frame without asking Python.
#[pyclass(module = "whipcast.gateway._fanout")]
struct Track {
    cipher: Cipher,
    ssrc: u32,
    /// Newest packet index protected (libsrtp's `rdbx->index`).
    newest: u64,
    /// Our own duplicate of the socket's descriptor (-1: none), so that a number the
    /// event loop closed and reused never receives this track's packets.
    fd: i32,
    dest: Option<libc::sockaddr_storage>,
    dest_len: libc::socklen_t,
    scratch: Vec<u8>,
    /// The sequence number the next media packet gets.
    #[pyo3(get, set)]
    seq: u16,
    /// Packets and octets (past the fixed 12 bytes) sent by `send`, `protect_frame`
    /// and `send_batch`; frames sent by `send_batch` alone.
    #[pyo3(get)]
    packets_sent: u64,
    #[pyo3(get)]
    octets_sent: u64,
    #[pyo3(get)]
    batch_frames: u64,
    /// RTP timestamp of the newest frame sent, and its ingest arrival time (µs).
    #[pyo3(get)]
    last_ts: u32,
    #[pyo3(get, set)]
    last_arrival_us: i64,
    /// Added by `send_batch` to the frame's timestamp and arrival time (a replay's
    /// re-based timeline, once the viewer follows the live stream again).
    #[pyo3(get, set)]
    ts_offset: u32,
    #[pyo3(get, set)]
    arrival_shift_us: i64,
    /// Octets `send_batch` may still send this track (its viewer's send budget as
    /// Python last saw it); at 0 or below a batch passes it by.
    #[pyo3(get, set)]
    allowance: i64,
    /// Most packets a frame may have for `send_batch` to send it (0: any); a larger
    /// one is the viewer's pacer's.
    #[pyo3(get, set)]
    max_packets: usize,
    history: VecDeque<Sent>,
    history_len: usize,
    sends: u64,
    /// Whether runs of packets go as UDP GSO messages (until the kernel refuses one).
    gso: bool,
    /// The viewer's transport-wide numbering, where it negotiated transport-cc.
    log: Option<Arc<Mutex<Ring>>>,
    /// SRTCP context of the same SSRC: every RTCP packet sent from it is this track's.
    rtcp: Cipher,
    /// Last SRTCP index used (libsrtp starts at 1, refuses past 2^31 - 1).
    #[pyo3(get, set)]
    rtcp_index: u32,
    /// Sender reports: the CNAME its SDES carries, the RTP clock rate, the mean
    /// interval in s (RFC 3550's x 0.5-1.5 per report) and when the next one is due
    /// (`time.monotonic()`; [`send_reports`] sends it then); reports sent.
    cname: Vec<u8>,
    #[pyo3(get, set)]
    clock_rate: u32,
    #[pyo3(get, set)]
    report_interval: f64,
    #[pyo3(get, set)]
    next_report: f64,
    #[pyo3(get)]
    reports_sent: u64,
}

/// Where one `send` of a frame (or a pacer's slice of it) goes in a viewer's stream.
#[derive(Clone, Copy)]
struct Frame {
    seq: u16,
    ts: u32,
    first: usize,
    end: usize,
    sent_at: Option<u32>,
}

impl Frame {
    fn new(
        packets: &Data,
        seq: u16,
        ts: u32,
        first: usize,
        end: Option<usize>,
        sent_at: Option<u32>,
    ) -> PyResult<Self> {
        if sent_at.is_some() && packets.abs_send_time_at.is_none() {
            return Err(PyValueError::new_err(
                "an abs-send-time for packets without its hole",
            ));
        }
        let (first, end) = packets.range(first, end);
        Ok(Frame {
            seq,
            ts,
            first,
            end,
            sent_at: sent_at.map(|v| v & 0xFF_FFFF),
        })
    }
}

/// Python's `time.monotonic()`, for the send history's ages.
fn monotonic() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

/// Write packet `i` of `packets` into `buf` (its exact length) as a viewer's: the
/// fixed header with this viewer's sequence number, timestamp and SSRC, the rest of the
/// header and the payload, and (where given) the abs-send-time value in its hole. The
/// one place a packet's per-viewer header bytes are written: a further per-packet
/// field (a transport-wide sequence number) goes here too.
#[inline]
fn write_packet(
    buf: &mut [u8],
    packets: &Data,
    i: usize,
    seq: u16,
    ts: u32,
    ssrc: u32,
    abs_send_time: Option<(usize, [u8; 4])>,
) {
    let rest = &packets.data[packets.bounds[i]..packets.bounds[i + 1]];
    buf[..2].copy_from_slice(&packets.heads[i]);
    buf[2..4].copy_from_slice(&seq.to_be_bytes());
    buf[4..8].copy_from_slice(&ts.to_be_bytes());
    buf[8..12].copy_from_slice(&ssrc.to_be_bytes());
    buf[12..12 + rest.len()].copy_from_slice(rest);
    if let Some((at, value)) = abs_send_time {
        buf[at..at + 3].copy_from_slice(&value[1..]);
    }
}

impl Drop for Track {
    fn drop(&mut self) {
        self.close_fd();
    }
}

// SAFETY: sockaddr_storage is plain data; a Track is only used under its PyRefMut.
unsafe impl Send for Track {}

/// A track borrowed for a batch, used with the GIL released (its PyRefMut is held).
struct TrackPtr(*mut Track);
// SAFETY: each pointer is to a distinct Track whose PyRefMut outlives its use.
unsafe impl Send for TrackPtr {}

/// Every track of `tracks` borrowed mutably (a track listed twice fails here), and a
/// pointer to each for work with the GIL released while the borrows are held.
fn borrow_tracks<'py>(
    tracks: &Bound<'py, PyList>,
) -> PyResult<(Vec<PyRefMut<'py, Track>>, Vec<TrackPtr>)> {
    let mut held: Vec<PyRefMut<'py, Track>> = Vec::with_capacity(tracks.len());
    for item in tracks.iter() {
        held.push(item.downcast_into::<Track>()?.try_borrow_mut()?);
    }
    let ptrs = held
        .iter_mut()
        .map(|t| TrackPtr(&mut **t as *mut Track))
        .collect();
    Ok((held, ptrs))
}

impl Track {
    fn close_fd(&mut self) {
        if self.fd >= 0 {
            // SAFETY: our own duplicate, closed once.
            unsafe { libc::close(self.fd) };
            self.fd = -1;
        }
        self.dest = None;
    }

    fn index_for(&mut self, seq: u16) -> PyResult<u64> {
        let (index, delta) = estimate(self.newest, seq);
        if delta > 0 {
            self.newest = index;
        } else if delta + WINDOW - 1 < 0 {
            return Err(PyValueError::new_err(
                "SRTP index too old to protect (replay window)",
            ));
        }
        Ok(index)
    }

    /// Build, protect and send one frame's packets; returns the protected packets
    /// the kernel did not take (its buffer was full) for the caller to queue.
    /// Packets `first..end` get sequence numbers from `seq` on; `sent_at`, a 24-bit
    /// abs-send-time value, goes into each packet's hole for it. The send is counted,
    /// kept in the history and moves `self.seq` on.
    fn send_inner(&mut self, data: &Arc<Data>, frame: Frame, direct: bool) -> Vec<Vec<u8>> {
        let packets: &Data = data;
        let Frame {
            seq,
            ts,
            first,
            end,
            sent_at,
        } = frame;
        let tag_len = self.cipher.tag_len();
        let count = end - first;
        let octets = packets.bounds[end] - packets.bounds[first];
        let total = octets + count * (12 + tag_len);
        let hole = packets
            .abs_send_time_at
            .zip(sent_at)
            .map(|(at, v)| (12 + at, v.to_be_bytes()));
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        scratch.resize(total, 0);
        let mut spans = Vec::with_capacity(count);
        let mut at = 0;
        let twcc_at = packets.transport_cc_at.map(|a| 12 + a);
        let log = twcc_at.and(self.log.clone());
        let mut ring = log.as_ref().map(|l| l.lock().unwrap());
        let now_us = if ring.is_some() { monotonic_us() } else { 0 };
        for (n, i) in (first..end).enumerate() {
            let len = 12 + (packets.bounds[i + 1] - packets.bounds[i]) + tag_len;
            let buf = &mut scratch[at..at + len];
            let s = seq.wrapping_add(n as u16);
            write_packet(buf, packets, i, s, ts, self.ssrc, hole);
            if let (Some(t), Some(ring)) = (twcc_at, ring.as_mut()) {
                let number = ring.take((len - tag_len) as u32, now_us);
                buf[t..t + 2].copy_from_slice(&number.to_be_bytes());
            }
            // Sequence numbers only move forward here, so the index never is too old.
            let index = self.index_for(s).unwrap_or(s as u64);
            self.cipher
                .protect(buf, 12 + packets.header_tail, self.ssrc, index);
            spans.push((at, len));
            at += len;
        }
        drop(ring);
        let sent = if direct {
            self.sendmmsg(&scratch, &spans)
        } else {
            0
        };
        let unsent = spans[sent..]
            .iter()
            .map(|&(a, l)| scratch[a..a + l].to_vec())
            .collect();
        self.scratch = scratch;
        self.record(data, frame, count, octets);
        unsent
    }

    fn record(&mut self, data: &Arc<Data>, frame: Frame, count: usize, octets: usize) {
        if self.history.len() >= self.history_len {
            self.history.pop_front();
        }
        self.sends += 1;
        if self.history_len > 0 {
            self.history.push_back(Sent {
                id: self.sends,
                seq: frame.seq,
                first: frame.first,
                count,
                data: Arc::clone(data),
                ts: frame.ts,
                at: monotonic(),
            });
        }
        self.seq = frame.seq.wrapping_add(count as u16);
        self.packets_sent += count as u64;
        self.octets_sent += octets as u64;
        self.last_ts = frame.ts;
    }

    /// One frame of a batch, if this track may take it: the frame's timestamp and
    /// arrival time moved by this track's offsets; returns None where it was passed by,
    /// else the packets the socket had no room for.
    fn batch_one(
        &mut self,
        data: &Arc<Data>,
        ts: u32,
        sent_at: Option<u32>,
        arrival_us: i64,
    ) -> Option<Vec<Vec<u8>>> {
        let count = data.heads.len();
        if self.dest.is_none()
            || self.allowance <= 0
            || (self.max_packets > 0 && count > self.max_packets)
        {
            return None;
        }
        let frame = Frame {
            seq: self.seq,
            ts: ts.wrapping_add(self.ts_offset),
            first: 0,
            end: count,
            sent_at,
        };
        let unsent = self.send_inner(data, frame, true);
        self.allowance -= data.data.len() as i64;
        self.batch_frames += 1;
        self.last_arrival_us = arrival_us + self.arrival_shift_us;
        Some(unsent)
    }

    /// `sendmmsg` the spans of `buf` in batches; returns how many were handed to the
    /// kernel (or lost to a hard error, as asyncio's transport loses them). Stops at the
    /// first EAGAIN/ENOBUFS. Where the kernel takes it, a run of packets of one length
    /// (the last may be shorter: a frame's fragments) goes as one UDP GSO message
    /// (`UDP_SEGMENT`), which the kernel splits into the same datagrams.
    fn sendmmsg(&mut self, buf: &[u8], spans: &[(usize, usize)]) -> usize {
        let Some(dest) = self.dest else {
            return 0;
        };
        let iovs: Vec<libc::iovec> = spans
            .iter()
            .map(|&(a, l)| libc::iovec {
                iov_base: buf[a..].as_ptr() as *mut _,
                iov_len: l,
            })
            .collect();
        let runs = if self.gso {
            gso_runs(spans)
        } else {
            vec![1; spans.len()]
        };
        let mut cmsgs: Vec<GsoCmsg> = runs
            .iter()
            .scan(0, |at, &n| {
                let size = spans[*at].1 as u16;
                *at += n;
                Some(GsoCmsg::new(size))
            })
            .collect();
        let (mut done, mut run) = (0, 0);
        while run < runs.len() {
            let n = (runs.len() - run).min(BATCH);
            let mut at = done;
            // SAFETY: zeroed mmsghdr is valid; every pointer outlives the call.
            let mut msgs: Vec<libc::mmsghdr> = (run..run + n)
                .map(|r| {
                    let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                    m.msg_hdr.msg_name = &dest as *const _ as *mut libc::c_void;
                    m.msg_hdr.msg_namelen = self.dest_len;
                    m.msg_hdr.msg_iov = iovs[at..].as_ptr() as *mut libc::iovec;
                    m.msg_hdr.msg_iovlen = runs[r];
                    if runs[r] > 1 {
                        m.msg_hdr.msg_control = &mut cmsgs[r] as *mut GsoCmsg as *mut _;
                        m.msg_hdr.msg_controllen = std::mem::size_of::<GsoCmsg>();
                    }
                    at += runs[r];
                    m
                })
                .collect();
            let rc = unsafe {
                libc::sendmmsg(
                    self.fd,
                    msgs.as_mut_ptr(),
                    n as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if rc > 0 {
                done += runs[run..run + rc as usize].iter().sum::<usize>();
                run += rc as usize;
                continue;
            }
            let err = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            match err {
                libc::EINTR => continue,
                libc::EAGAIN | libc::ENOBUFS => break,
                libc::EINVAL | libc::EIO | libc::EOPNOTSUPP | libc::ENOPROTOOPT
                    if runs[run] > 1 =>
                {
                    // No GSO here (an old kernel, a device without it): one by one, for good.
                    self.gso = false;
                    return done + self.sendmmsg_plain(buf, &spans[done..]);
                }
                _ => {
                    done += runs[run]; // lost, as asyncio's datagram transport loses it
                    run += 1;
                }
            }
        }
        done
    }

    /// This track's sender report as aiortc builds one (`RtcpSrPacket` then
    /// `RtcpSdesPacket` with the CNAME): the RTP time of wall-clock `now_us` follows
    /// from the last frame's timestamp and ingest arrival time (so a publisher's audio
    /// and video share one clock), `ntp` is the same instant as NTP time.
    fn report(&self, ntp: u64, now_us: i64) -> Vec<u8> {
        let elapsed = (now_us - self.last_arrival_us) as f64 / 1e6;
        let ticks = (elapsed * self.clock_rate as f64) as i64;
        let rtp_ts = (self.last_ts as i64).wrapping_add(ticks) as u32;
        let mut out = Vec::with_capacity(40 + self.cname.len() + 16);
        out.extend_from_slice(&[0x80, 200, 0, 6]);
        out.extend_from_slice(&self.ssrc.to_be_bytes());
        out.extend_from_slice(&ntp.to_be_bytes());
        out.extend_from_slice(&rtp_ts.to_be_bytes());
        out.extend_from_slice(&(self.packets_sent as u32).to_be_bytes());
        out.extend_from_slice(&(self.octets_sent as u32).to_be_bytes());
        // SDES: one chunk, CNAME, two zero octets, padded to a 32-bit boundary.
        let chunk = (4 + 2 + self.cname.len() + 2).div_ceil(4) * 4;
        out.extend_from_slice(&[0x81, 202]);
        out.extend_from_slice(&((chunk / 4) as u16).to_be_bytes());
        out.extend_from_slice(&self.ssrc.to_be_bytes());
        out.extend_from_slice(&[1, self.cname.len() as u8]);
        out.extend_from_slice(&self.cname);
        out.resize(28 + 4 + chunk, 0);
        out
    }

    /// SRTCP-protect `buf` with the next SRTCP index; None once the index space is
    /// spent (2^31 - 1 reports: libsrtp then refuses with `key_expired` too).
    fn protect_rtcp_next(&mut self, buf: &mut Vec<u8>) -> Option<()> {
        if self.rtcp_index >= 0x7FFF_FFFF {
            return None;
        }
        self.rtcp_index += 1;
        self.rtcp.protect_rtcp(buf, self.ssrc, self.rtcp_index);
        Some(())
    }

    /// One datagram to the route, not waiting: a report the socket has no room for
    /// is lost (the next one follows within seconds).
    fn send_datagram(&self, buf: &[u8]) -> bool {
        let Some(dest) = self.dest else {
            return false;
        };
        // SAFETY: our own descriptor, a buffer and address valid for the call.
        let rc = unsafe {
            libc::sendto(
                self.fd,
                buf.as_ptr() as *const libc::c_void,
                buf.len(),
                libc::MSG_DONTWAIT,
                &dest as *const _ as *const libc::sockaddr,
                self.dest_len,
            )
        };
        rc >= 0
    }

    /// The sender report of [`send_reports`] if due at `now` (monotonic s); schedules
    /// the next. `wall` is (NTP time, µs since the Unix epoch) of the same instant.
    fn report_if_due(&mut self, now: f64, wall: (u64, i64)) {
        if self.dest.is_none() || self.next_report > now {
            return;
        }
        self.next_report = now + self.report_interval * (0.5 + jitter());
        if self.last_arrival_us == 0 {
            return; // nothing sent yet: nothing to map
        }
        let mut buf = self.report(wall.0, wall.1);
        if self.protect_rtcp_next(&mut buf).is_some() && self.send_datagram(&buf) {
            self.reports_sent += 1;
        }
    }

    fn sendmmsg_plain(&mut self, buf: &[u8], spans: &[(usize, usize)]) -> usize {
        let gso = std::mem::replace(&mut self.gso, false);
        let sent = self.sendmmsg(buf, spans);
        self.gso = gso;
        sent
    }
}

/// Linux's UDP generic segmentation offload: one message, many datagrams of one size.
const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
/// Datagrams one GSO message may carry (the kernel's UDP_MAX_SEGMENTS) and bytes.
const GSO_MAX_SEGMENTS: usize = 64;
const GSO_MAX_BYTES: usize = 65_000;

/// A control message setting `UDP_SEGMENT` (CMSG_SPACE of a u16 on 64-bit Linux).
#[repr(C)]
struct GsoCmsg {
    hdr: libc::cmsghdr,
    size: u16,
    _pad: [u8; 6],
}

impl GsoCmsg {
    fn new(size: u16) -> Self {
        // SAFETY: a zeroed cmsghdr is valid; its fields are set below.
        let mut hdr: libc::cmsghdr = unsafe { std::mem::zeroed() };
        hdr.cmsg_level = SOL_UDP;
        hdr.cmsg_type = UDP_SEGMENT;
        hdr.cmsg_len = std::mem::size_of::<libc::cmsghdr>() + 2;
        GsoCmsg {
            hdr,
            size,
            _pad: [0; 6],
        }
    }
}

/// The spans as runs for GSO: each run's packets all have its first one's length but
/// the last, which may be shorter (how the kernel cuts a GSO message).
fn gso_runs(spans: &[(usize, usize)]) -> Vec<usize> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < spans.len() {
        let size = spans[i].1;
        let (mut n, mut bytes) = (1, size);
        while i + n < spans.len()
            && n < GSO_MAX_SEGMENTS
            && bytes + spans[i + n].1 <= GSO_MAX_BYTES
            && spans[i + n].1 <= size
        {
            bytes += spans[i + n].1;
            n += 1;
            if spans[i + n - 1].1 < size {
                break; // a shorter one ends the run
            }
        }
        runs.push(n);
        i += n;
    }
    runs
}

#[pymethods]
impl Track {
    /// `profile`: the negotiated DTLS-SRTP profile name; `key_salt`: the sending
    /// master key followed by the master salt; `ssrc`: the one media SSRC it protects;
    /// `history`: sends kept for NACKs.
    #[new]
    #[pyo3(signature = (profile, key_salt, ssrc, history = 256))]
    fn new(profile: &str, key_salt: &[u8], ssrc: u32, history: usize) -> PyResult<Self> {
        let cipher = Cipher::new(profile, key_salt, false).map_err(PyValueError::new_err)?;
        let rtcp = Cipher::new(profile, key_salt, true).map_err(PyValueError::new_err)?;
        Ok(Track {
            cipher,
            ssrc,
            newest: 0,
            fd: -1,
            dest: None,
            dest_len: 0,
            scratch: Vec::new(),
            seq: 0,
            packets_sent: 0,
            octets_sent: 0,
            batch_frames: 0,
            last_ts: 0,
            last_arrival_us: 0,
            ts_offset: 0,
            arrival_shift_us: 0,
            allowance: 0,
            max_packets: 0,
            history: VecDeque::with_capacity(history),
            history_len: history,
            sends: 0,
            gso: true,
            log: None,
            rtcp,
            rtcp_index: 0,
            cname: Vec::new(),
            clock_rate: 90_000,
            report_interval: 1.0,
            next_report: 0.0,
            reports_sent: 0,
        })
    }

    /// Number and log every packet in `log` (the viewer's transport-wide counter) where
    /// the packets have a transport-cc hole.
    fn log_to(&mut self, log: &SendLog) {
        self.log = Some(log.ring.clone());
    }

    /// Where `send` writes: a UDP socket's file descriptor (the track keeps its own
    /// duplicate of it) and the viewer's address.
    fn route(&mut self, fd: i32, host: &str, port: u16) -> PyResult<()> {
        let ip: IpAddr = host
            .parse()
            .map_err(|_| PyValueError::new_err(format!("not an IP: {host:?}")))?;
        let addr = SocketAddr::new(ip, port);
        // SAFETY: sockaddr_storage is large enough for either family.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match addr {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(*a.ip()).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: 0,
                };
                unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        // SAFETY: dup of a descriptor the caller holds open; ours until close_fd.
        let own = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if own < 0 {
            return Err(PyOSError::new_err(
                std::io::Error::last_os_error().to_string(),
            ));
        }
        self.close_fd();
        self.fd = own;
        self.dest = Some(storage);
        self.dest_len = len as libc::socklen_t;
        Ok(())
    }

    /// Stop sending: the connection is gone (`send` refuses, batches pass it by).
    fn unroute(&mut self) {
        self.close_fd();
    }

    /// Whether the track has a route.
    #[getter]
    fn routed(&self) -> bool {
        self.dest.is_some()
    }

    /// Send one frame, or its packets `first` up to `end` (a pacer's slice): the i-th
    /// packet sent gets sequence number `seq + i`, timestamp `ts`, this track's SSRC and
    /// (where given) the 24-bit `abs_send_time` value in the packets' hole for it, is
    /// SRTP-protected and goes out with `sendmmsg`, the GIL released.
    /// Returns None, or the protected packets the socket had no room for (in order):
    /// the caller queues them on the socket's transport.
    #[pyo3(signature = (packets, seq, ts, first = 0, end = None, abs_send_time = None))]
    #[allow(clippy::too_many_arguments)]
    fn send(
        mut slf: PyRefMut<'_, Self>,
        py: Python<'_>,
        packets: &Bound<'_, Packets>,
        seq: u16,
        ts: u32,
        first: usize,
        end: Option<usize>,
        abs_send_time: Option<u32>,
    ) -> PyResult<Option<Vec<Py<PyBytes>>>> {
        if slf.dest.is_none() {
            return Err(PyOSError::new_err("track has no route"));
        }
        let data = &packets.get().data;
        let at = Frame::new(data, seq, ts, first, end, abs_send_time)?;
        let track: &mut Track = &mut slf;
        let unsent = py.allow_threads(|| track.send_inner(data, at, true));
        if unsent.is_empty() {
            return Ok(None);
        }
        Ok(Some(
            unsent
                .iter()
                .map(|p| PyBytes::new(py, p).unbind())
                .collect(),
        ))
    }

    /// What `send` sends, protected but not sent: for a caller that must queue them
    /// behind packets already waiting on the socket's transport.
    #[pyo3(signature = (packets, seq, ts, first = 0, end = None, abs_send_time = None))]
    #[allow(clippy::too_many_arguments)]
    fn protect_frame(
        &mut self,
        py: Python<'_>,
        packets: &Bound<'_, Packets>,
        seq: u16,
        ts: u32,
        first: usize,
        end: Option<usize>,
        abs_send_time: Option<u32>,
    ) -> PyResult<Vec<Py<PyBytes>>> {
        let data = &packets.get().data;
        let at = Frame::new(data, seq, ts, first, end, abs_send_time)?;
        let out = self.send_inner(data, at, false);
        Ok(out.iter().map(|p| PyBytes::new(py, p).unbind()).collect())
    }

    /// SRTP-protect one RTP packet of this track's SSRC (for resends and tests).
    fn protect<'py>(&mut self, py: Python<'py>, packet: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        let hlen = header_len(packet).ok_or_else(|| PyValueError::new_err("not an RTP packet"))?;
        let ssrc = u32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]);
        if ssrc != self.ssrc {
            return Err(PyValueError::new_err("packet of another SSRC"));
        }
        let index = self.index_for(u16::from_be_bytes([packet[2], packet[3]]))?;
        let mut buf = Vec::with_capacity(packet.len() + 16);
        buf.extend_from_slice(packet);
        buf.resize(packet.len() + self.cipher.tag_len(), 0);
        self.cipher.protect(&mut buf, hlen, ssrc, index);
        Ok(PyBytes::new(py, &buf))
    }

    /// The newest packet sent with sequence number `seq`, from the history, as
    /// `(send id, bytes 0-1, bytes 12-end, timestamp, monotonic send time)`; the rest
    /// has zeros where the abs-send-time value goes. None if it is not kept.
    #[allow(clippy::type_complexity)]
    fn find<'py>(
        &self,
        py: Python<'py>,
        seq: u16,
    ) -> Option<(u64, Bound<'py, PyBytes>, Bound<'py, PyBytes>, u32, f64)> {
        self.history.iter().rev().find_map(|sent| {
            let n = seq.wrapping_sub(sent.seq) as usize;
            (n < sent.count).then(|| {
                let i = sent.first + n;
                let data = &sent.data;
                let rest = &data.data[data.bounds[i]..data.bounds[i + 1]];
                (
                    sent.id,
                    PyBytes::new(py, &data.heads[i]),
                    PyBytes::new(py, rest),
                    sent.ts,
                    sent.at,
                )
            })
        })
    }

    /// Newest SRTP packet index (rollover counter << 16 | sequence number).
    #[getter]
    fn index(&self) -> u64 {
        self.newest
    }

    /// The CNAME sender reports carry in their SDES (at most 255 bytes).
    #[getter]
    fn cname(&self) -> String {
        String::from_utf8_lossy(&self.cname).into_owned()
    }

    #[setter]
    fn set_cname(&mut self, cname: &str) -> PyResult<()> {
        if cname.len() > 255 {
            return Err(PyValueError::new_err("a CNAME is at most 255 bytes"));
        }
        self.cname = cname.as_bytes().to_vec();
        Ok(())
    }

    /// This track's sender report and SDES (plain RTCP) at NTP time `ntp`, which is
    /// `now_us` µs after the Unix epoch: what [`send_reports`] protects and sends.
    #[pyo3(name = "report")]
    fn py_report<'py>(&self, py: Python<'py>, ntp: u64, now_us: i64) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.report(ntp, now_us))
    }

    /// SRTCP-protect a compound RTCP packet sent from this track's SSRC (a BYE, the
    /// sender reports of a track without a route) with the next SRTCP index: once a
    /// track exists, no other context may protect RTCP of its SSRC, or the two
    /// index sequences would collide in the viewer's replay check.
    fn protect_rtcp<'py>(
        &mut self,
        py: Python<'py>,
        packet: &[u8],
    ) -> PyResult<Bound<'py, PyBytes>> {
        if packet.len() < 8 || packet[0] >> 6 != 2 {
            return Err(PyValueError::new_err("not an RTCP packet"));
        }
        if u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]) != self.ssrc {
            return Err(PyValueError::new_err("RTCP of another SSRC"));
        }
        let mut buf = Vec::with_capacity(packet.len() + 20);
        buf.extend_from_slice(packet);
        self.protect_rtcp_next(&mut buf)
            .ok_or_else(|| PyValueError::new_err("SRTCP index spent"))?;
        Ok(PyBytes::new(py, &buf))
    }
}

/// One frame to every track in `tracks` (viewers of one layout), in one call with the
/// GIL released: per track what `Track.send` does, at the track's own `seq`, with `ts`
/// and `arrival_us` moved by its offsets, and its `allowance` spent. A track without a
/// route, without allowance left or whose `max_packets` the frame exceeds is passed by.
/// Returns `(indices passed by, [(index, packets the socket had no room for)])`: the
/// caller sends those frames its own way and queues those packets.
#[pyfunction]
#[pyo3(signature = (tracks, packets, ts, abs_send_time = None, arrival_us = 0))]
#[allow(clippy::type_complexity)]
fn send_batch(
    py: Python<'_>,
    tracks: &Bound<'_, PyList>,
    packets: &Bound<'_, Packets>,
    ts: u32,
    abs_send_time: Option<u32>,
    arrival_us: i64,
) -> PyResult<(Vec<usize>, Vec<(usize, Vec<Py<PyBytes>>)>)> {
    let data = &packets.get().data;
    if abs_send_time.is_some() && data.abs_send_time_at.is_none() {
        return Err(PyValueError::new_err(
            "an abs-send-time for packets without its hole",
        ));
    }
    let sent_at = abs_send_time.map(|v| v & 0xFF_FFFF);
    let (held, ptrs) = borrow_tracks(tracks)?;
    let (passed, unsent) = py.allow_threads(move || {
        let (mut passed, mut unsent) = (Vec::new(), Vec::new());
        for (n, ptr) in ptrs.into_iter().enumerate() {
            // SAFETY: distinct tracks (each borrowed once above), borrows held.
            let track = unsafe { &mut *ptr.0 };
            match track.batch_one(data, ts, sent_at, arrival_us) {
                None => passed.push(n),
                Some(left) if !left.is_empty() => unsent.push((n, left)),
                Some(_) => {}
            }
        }
        (passed, unsent)
    });
    drop(held);
    let unsent = unsent
        .into_iter()
        .map(|(n, left)| {
            let left = left.iter().map(|p| PyBytes::new(py, p).unbind()).collect();
            (n, left)
        })
        .collect();
    Ok((passed, unsent))
}

/// The sender reports due now of `tracks` (any viewers' routed tracks), in one call
/// with the GIL released: each SRTCP-protected (see [`Track::protect_rtcp`]) and sent
/// on its track's route; each track's next report is scheduled at its
/// `report_interval` x 0.5-1.5. A track that has sent no frame yet is only
/// rescheduled. Returns `(reports sent, indices of the tracks without a route)`: those
/// have lost their connection for good and report no more.
#[pyfunction]
fn send_reports(py: Python<'_>, tracks: &Bound<'_, PyList>) -> PyResult<(u64, Vec<usize>)> {
    let (held, ptrs) = borrow_tracks(tracks)?;
    let out = py.allow_threads(move || {
        let (now, wall) = (monotonic(), wall_clock());
        let (mut sent, mut gone) = (0, Vec::new());
        for (n, ptr) in ptrs.into_iter().enumerate() {
            // SAFETY: distinct tracks (each borrowed once above), borrows held.
            let track = unsafe { &mut *ptr.0 };
            if track.dest.is_none() {
                gone.push(n);
                continue;
            }
            let before = track.reports_sent;
            track.report_if_due(now, wall);
            sent += track.reports_sent - before;
        }
        (sent, gone)
    });
    drop(held);
    Ok(out)
}

#[pymodule]
fn _fanout(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Packets>()?;
    m.add_class::<Track>()?;
    m.add_function(wrap_pyfunction!(send_batch, m)?)?;
    m.add_function(wrap_pyfunction!(send_reports, m)?)?;
    m.add_class::<SendLog>()?;
    m.add("PROFILES", (CM_SHA1_80, GCM_128, GCM_256))?;
    Ok(())
}
