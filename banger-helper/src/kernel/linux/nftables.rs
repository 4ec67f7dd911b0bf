//! The firewall through nf_tables over netlink, in the helper's process: one netfilter netlink
//! socket, opened at start in the helper's network namespace; dumps of the helper's sets to
//! read, and one batch per change, which the kernel applies atomically or not at all. The
//! rules themselves are data in [`crate::firewall::nft`].
//!
//! Every request asks for an acknowledgement, and every reply is matched to its request by
//! sequence number; a reply that does not come within the time limit is an error (the socket is
//! the helper's own, so nothing else answers on it).

use std::collections::BTreeSet;
use std::os::fd::AsFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use banger_policy::Network;
use banger_protocol::FirewallBackend;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NetlinkBuffer,
    NetlinkMessage, NetlinkPayload, ParseableParametrized,
};
use netlink_packet_netfilter::nftables::{
    GenMessage, NfTablesMessage, RuleAttribute, RuleMessage, SetElementList, SetElementMessage,
};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::Socket;
use netlink_sys::protocols::NETLINK_NETFILTER;
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::firewall::VmRules;
use crate::firewall::nft::{self, Element, Message, NftView, TABLE};
use crate::kernel::{Firewall, KResult, KernelError};
use crate::names::VmKey;

/// The subsystem id of nf_tables in a batch's begin and end messages (`NFNL_SUBSYS_NFTABLES`).
const NFNL_SUBSYS_NFTABLES: u16 = 10;

/// The netfilter header before an nf_tables message's attributes (`struct nfgenmsg`).
const NETFILTER_HEADER: usize = 4;
/// nf_tables message types read from dumps.
const NFT_MSG_NEWGEN: u8 = 15;
const NFT_MSG_NEWSETELEM: u8 = 12;

/// How long the kernel may take to answer one request or batch.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The firewall through nf_tables.
#[derive(Debug)]
pub struct Nftables {
    socket: Mutex<Socket>,
    seq: AtomicU32,
}

/// What one reply was.
enum Reply {
    /// An acknowledgement, or the end of a dump.
    Done,
    /// An error, as the kernel's errno.
    Error(Errno),
    /// Part of a dump: its nf_tables message type and its payload after the netfilter header,
    /// read by the caller (a set's elements with the netlink crate's attribute iterator: the
    /// netfilter crate's parser formats the whole element list once per element).
    Data(u8, Vec<u8>),
    /// Part of a dump that the kernel says changed while it was being dumped.
    Interrupted,
}

/// The socket's send and receive buffers: a batch is one message (one that puts back every
/// element of a thousand VMs is about 600 KiB), and each of its messages is answered.
const SOCKET_BUFFER: usize = 4 << 20;

/// How often a dump that changed while being read is read again.
const DUMP_TRIES: usize = 3;

fn error(op: &'static str, detail: impl Into<String>) -> KernelError {
    KernelError::other(op, format!("nftables table {TABLE}"), detail)
}

impl Nftables {
    /// Opens the socket, asks the kernel for nf_tables' generation, and has it check (and throw
    /// away) the batch that would make the table with `net`'s rules: an error when the kernel
    /// has no nf_tables, lacks something the rules use (the `nat` chain type, `ct`, `masq`,
    /// concatenated sets), or the helper may not use it.
    pub fn open(net: &Network) -> KResult<Self> {
        let io = |e: std::io::Error| KernelError::io("netfilter netlink socket", "nf_tables", e);
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(io)?;
        socket.bind_auto().map_err(io)?;
        socket.set_ext_ack(true).map_err(io)?;
        // A batch goes out in one message: room for one that puts back a thousand VMs, and for
        // the answers to its messages. Without the capability to force them, the usual limits.
        use nix::sys::socket::{setsockopt, sockopt};
        if let Err(e) = setsockopt(&socket, sockopt::SndBufForce, &SOCKET_BUFFER)
            .and_then(|()| setsockopt(&socket, sockopt::RcvBufForce, &SOCKET_BUFFER))
        {
            tracing::warn!("cannot raise the netfilter socket's buffers ({e}); large batches may fail");
            let _ = setsockopt(&socket, sockopt::SndBuf, &SOCKET_BUFFER);
            let _ = setsockopt(&socket, sockopt::RcvBuf, &SOCKET_BUFFER);
        }
        let nft = Nftables { socket: Mutex::new(socket), seq: AtomicU32::new(1) };
        let get_gen = NfTablesMessage::GetGen(GenMessage { attributes: vec![] });
        let mut answered = false;
        nft.request("nf_tables generation", get_gen, NLM_F_REQUEST | NLM_F_ACK, |kind, _| {
            answered |= kind == NFT_MSG_NEWGEN;
        })?;
        if !answered {
            return Err(error("nf_tables generation", "the kernel did not report one"));
        }
        let table = nft::NftPlan { create: true, ..nft::NftPlan::default() }.messages(net);
        nft.batch("nftables check", table, false)?;
        Ok(nft)
    }

    /// Whether the helper's table exists.
    pub fn table_present(&self) -> KResult<bool> {
        Ok(self.view()?.present)
    }

    fn socket(&self) -> std::sync::MutexGuard<'_, Socket> {
        self.socket.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn next_seq(&self) -> u32 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    fn message(inner: impl Into<NetfilterMessageInner>, res_id: u16, flags: u16, seq: u32) -> Vec<u8> {
        let header = NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, res_id);
        let mut m = NetlinkMessage::from(NetfilterMessage::new(header, inner));
        m.header.flags = flags;
        m.header.sequence_number = seq;
        m.finalize();
        let mut buf = vec![0; m.buffer_len()];
        m.serialize(&mut buf);
        buf
    }

    fn send(socket: &Socket, op: &'static str, bytes: &[u8]) -> KResult<()> {
        let sent = socket.send(bytes, 0).map_err(|e| error(op, format!("send: {e}")))?;
        if sent != bytes.len() {
            return Err(error(op, format!("sent {sent} of {} bytes", bytes.len())));
        }
        Ok(())
    }

    /// Reads replies until `pending` holds no sequence number; each reply to one of them goes to
    /// `each` (a dump's parts, then its end; an acknowledgement; an error). An error answering
    /// one of `fatal` goes to `each` and ends the wait: the kernel answers a batch it could not
    /// commit (or could not keep every answer of) with one error, against the batch's first
    /// message, before anything else, and may send no other answer. Replies to other (earlier,
    /// timed-out) requests are dropped.
    fn receive(
        socket: &Socket,
        op: &'static str,
        pending: &mut BTreeSet<u32>,
        fatal: &[u32],
        mut each: impl FnMut(Reply),
    ) -> KResult<()> {
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let mut buf = Vec::with_capacity(1 << 16);
        while !pending.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
            let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLIN)];
            let ready = match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(error(op, format!("poll: {e}"))),
            };
            if ready == 0 {
                return Err(error(
                    op,
                    format!("no answer from the kernel within {} s", REPLY_TIMEOUT.as_secs()),
                ));
            }
            buf.clear();
            let n = socket.recv(&mut buf, 0).map_err(|e| error(op, format!("receive: {e}")))?;
            let mut at = 0;
            while at < n {
                let unreadable = |e| error(op, format!("cannot read the kernel's answer: {e}"));
                let nb = NetlinkBuffer::new_checked(&buf[at..n]).map_err(unreadable)?;
                let len = usize::try_from(nb.length()).unwrap_or(usize::MAX);
                let (kind, flags, seq) = (nb.message_type(), nb.flags(), nb.sequence_number());
                let this = &buf[at..at + len];
                at += len.next_multiple_of(4);
                // The kernel may say so on a dump's parts and on its end alike.
                if pending.contains(&seq) && flags & NLM_F_DUMP_INTR != 0 {
                    each(Reply::Interrupted);
                }
                if kind != NLMSG_ERROR && kind != NLMSG_DONE {
                    if pending.contains(&seq) {
                        let payload = nb.payload().get(NETFILTER_HEADER..).unwrap_or_default();
                        each(Reply::Data((kind & 0xff) as u8, payload.to_vec()));
                    }
                    continue;
                }
                let m = NetlinkMessage::<NetfilterMessage>::deserialize(this).map_err(unreadable)?;
                if fatal.contains(&seq)
                    && let NetlinkPayload::Error(e) = &m.payload
                    && let Some(code) = e.code
                {
                    each(Reply::Error(Errno::from_raw(-code.get())));
                    pending.clear();
                    return Ok(());
                }
                if !pending.contains(&seq) {
                    continue;
                }
                let reply = match m.payload {
                    NetlinkPayload::Error(e) => match e.code {
                        Some(code) => Reply::Error(Errno::from_raw(-code.get())),
                        None => Reply::Done,
                    },
                    NetlinkPayload::Done(d) if d.code < 0 => Reply::Error(Errno::from_raw(-d.code)),
                    _ => Reply::Done,
                };
                pending.remove(&seq);
                each(reply);
            }
        }
        Ok(())
    }

    /// One request (a dump or a single message) and its answer: its data (message type and
    /// payload) go to `data`. A dump the kernel says changed while it was read is an `EINTR`
    /// error.
    fn request(
        &self,
        op: &'static str,
        msg: NfTablesMessage,
        flags: u16,
        mut data: impl FnMut(u8, &[u8]),
    ) -> KResult<()> {
        let socket = self.socket();
        let seq = self.next_seq();
        Self::send(&socket, op, &Self::message(msg, 0, flags, seq))?;
        let mut failed = None;
        Self::receive(&socket, op, &mut BTreeSet::from([seq]), &[], |reply| match reply {
            Reply::Data(kind, payload) => data(kind, &payload),
            Reply::Error(errno) => failed = Some(errno),
            Reply::Interrupted => {
                failed.get_or_insert(Errno::EINTR);
            }
            Reply::Done => {}
        })?;
        match failed {
            Some(errno) => Err(KernelError::errno(op, format!("nftables table {TABLE}"), errno)),
            None => Ok(()),
        }
    }

    /// The elements of one of the helper's sets; `None` when the table (or the set) is missing.
    fn dump_set(&self, set: &'static str) -> KResult<Option<Vec<Element>>> {
        let msg = NfTablesMessage::GetSetElement(SetElementMessage {
            attributes: vec![SetElementList::Table(TABLE.into()), SetElementList::Set(set.into())],
        });
        let mut elements = Vec::new();
        let mut unreadable = None;
        let r = self.request(
            "list set elements",
            msg,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_DUMP,
            |kind, payload| {
                if kind == NFT_MSG_NEWSETELEM {
                    match nft::elements_of(set, payload) {
                        Ok(found) => elements.extend(found),
                        Err(e) => unreadable = Some(e.to_string()),
                    }
                }
            },
        );
        if let Some(e) = unreadable {
            return Err(error("list set elements", format!("cannot read the elements of set {set}: {e}")));
        }
        match r {
            Ok(()) => Ok(Some(elements)),
            Err(e) if e.errno_value() == Some(Errno::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The table's rules: chain and comment, in order.
    fn dump_rules(&self) -> KResult<Vec<(String, Option<String>)>> {
        let msg =
            NfTablesMessage::GetRule(RuleMessage { attributes: vec![RuleAttribute::Table(TABLE.into())] });
        let mut rules = Vec::new();
        let mut unreadable = None;
        self.request("list rules", msg, NLM_F_REQUEST | NLM_F_ACK | NLM_F_DUMP, |kind, payload| {
            let m = match NfTablesMessage::parse_with_param(payload, kind) {
                Ok(NfTablesMessage::NewRule(m)) => m,
                Ok(_) => return,
                Err(e) => {
                    unreadable = Some(e.to_string());
                    return;
                }
            };
            let (mut chain, mut tag) = (String::new(), None);
            for a in m.attributes {
                match a {
                    RuleAttribute::Chain(c) => chain = c,
                    RuleAttribute::UserData(d) => tag = nft::parse_comment(&d),
                    _ => {}
                }
            }
            rules.push((chain, tag));
        })?;
        if let Some(e) = unreadable {
            return Err(error("list rules", format!("cannot read a rule: {e}")));
        }
        Ok(rules)
    }

    /// What the table holds now, read again when the kernel says it changed while being read. A
    /// table missing any of the sets reads as absent only when it is missing all of them;
    /// otherwise the sets it has are read (and the next batch makes the others).
    fn view(&self) -> KResult<NftView> {
        let mut tries = 1;
        loop {
            match self.read_view() {
                Err(e) if e.errno_value() == Some(Errno::EINTR) && tries < DUMP_TRIES => tries += 1,
                r => return r,
            }
        }
    }

    fn read_view(&self) -> KResult<NftView> {
        let mut view = NftView::default();
        for (set, _) in nft::SETS {
            if let Some(elements) = self.dump_set(set)? {
                view.present = true;
                view.elements.extend(elements);
            }
        }
        if view.present {
            view.rules = self.dump_rules()?;
        }
        Ok(view)
    }

    /// Sends the messages as one batch and waits for every answer: all applied, or none. Without
    /// `commit` the batch has no end: the kernel checks every message, answers each, and throws
    /// the batch away.
    fn batch(&self, op: &'static str, messages: Vec<Message>, commit: bool) -> KResult<()> {
        let socket = self.socket();
        let begin = self.next_seq();
        let mut bytes = Self::message(ControlMessage::BatchBegin, NFNL_SUBSYS_NFTABLES, NLM_F_REQUEST, begin);
        let mut pending = BTreeSet::new();
        for (msg, flags) in messages {
            let seq = self.next_seq();
            pending.insert(seq);
            bytes.extend(Self::message(msg, 0, flags, seq));
        }
        let first = pending.first().copied();
        let end = self.next_seq();
        if commit {
            bytes.extend(Self::message(ControlMessage::BatchEnd, NFNL_SUBSYS_NFTABLES, NLM_F_REQUEST, end));
        }
        Self::send(&socket, op, &bytes)?;
        let mut failed = None;
        let fatal: Vec<u32> = [Some(begin), first, Some(end)].into_iter().flatten().collect();
        Self::receive(&socket, op, &mut pending, &fatal, |reply| {
            if let Reply::Error(errno) = reply {
                failed.get_or_insert(errno);
            }
        })?;
        match failed {
            Some(errno) => Err(KernelError::errno(op, format!("nftables table {TABLE}"), errno)),
            None => Ok(()),
        }
    }
}

impl Firewall for Nftables {
    fn backend(&self) -> FirewallBackend {
        FirewallBackend::Nftables
    }

    async fn vms(&self) -> KResult<BTreeSet<VmKey>> {
        Ok(self.view()?.vms())
    }

    /// Dumps the sets and rules, works out the difference ([`nft::plan`]: rules that are not
    /// the policy's are written again) and applies it as one batch, or none when there is none.
    async fn update(&self, net: &Network, up: &[VmRules], down: &[VmKey]) -> KResult<bool> {
        let view = self.view()?;
        let plan = nft::plan(&view, up, down, net);
        if plan.is_empty() {
            return Ok(false);
        }
        self.batch("nftables batch", plan.messages(net), true)?;
        Ok(true)
    }
}
