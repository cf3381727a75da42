// Send and receive between two ranks of one node, through CUDA IPC.
//
// Every rank owns one IPC-shared allocation laid out as
//     [ Mailbox | slots ]
// and has opened every peer's (CUDA IPC), so a kernel on rank r can write
// rank p's memory over NVLink (or, for ranks sharing a GPU, in place) with
// ordinary stores. It works for ranks on one GPU as well as on several.
//
// The slots of rank R hold, for every sender S and lane l, a ring of
// kDepth slots of (16-byte header + chunk_bytes). A message of n bytes is cut
// into chunks (chunk_size below: about n / kLanes, at least 4 KiB, at most
// chunk_bytes); chunk i travels on lane i % kLanes, and lane l is block l of
// both kernels, so a message moves over up to kLanes blocks at once and a
// larger one streams through the rings. Both sides cut the same n the same
// way, so they agree on every lane's chunks without asking each other.
//
// One chunk, sender S to receiver R on lane l, as the k-th chunk ever sent
// on that lane (k counts from 0 and lives on both sides: S's Mailbox::sent,
// R's Mailbox::taken, read at kernel entry and written back at its end):
//   S: wait until its own Mailbox::freed[R][l] >= k + 1 - kDepth (ld.acquire.sys:
//        R has copied out the chunk that last used slot k % kDepth);
//      copy the chunk and its header into R's slot [S][l][k % kDepth];
//      bar.sync; fence.acq_rel.sys; st.relaxed.sys  R.ready[S][l] = k + 1.
//   R: wait until its own Mailbox::ready[S][l] >= k + 1 (ld.acquire.sys);
//      bar.sync; check the header; copy the chunk out of the slot;
//      bar.sync; fence.acq_rel.sys; st.relaxed.sys  S.freed[R][l] = k + 1.
// Why it is correct: the release/acquire pair on `ready` (after bar.sync, as
// in custom_all_reduce.cuh's barrier, whose argument applies word for word)
// makes the whole chunk visible to every thread of R's block before any of
// them reads it; the pair on `freed` orders R's reads of the slot before S's
// next writes to it, kDepth chunks later. Counters only grow (compared as
// wrap-safe signed differences), so nothing is ever reset and no late write
// can erase an early one (seed 000's lesson). Slot data is read with
// L2-only loads (ld.global.cg), so no L1 line of the slot's previous chunk is
// ever served.
//
// The counters live in device memory, so a send or a recv captured in a CUDA
// graph finds the right slot at every replay; the kernels take only this
// rank's own tensor (the sender's source, the receiver's destination), which
// needs no registration.
//
// Fail-stop, as in the all-reduce: every wait is bounded by timeout_ns and
// watches this rank's poison word. A block that gives up (the peer never
// sent, never received, or sent a message of another size or dtype, which
// the header tells) stops the communicator on every rank (CAS of its mark
// into every Mailbox::poison, then a system fence) and records the error in
// the host-mapped record; a receiving block that stopped writes NaN (all-ones
// bytes) over its lanes' chunks of the destination. A stopped rank sends
// nothing more. A peer that did not see the poison yet may still complete a
// send into a stopped rank's slot; nothing ever reads it. A receiver never
// reads a slot that its sender could still be writing: the sender rewrites
// a slot only after the receiver's `freed` for it, and one that stopped
// writes nothing at all.

#pragma once

#include "custom_all_reduce.cuh"  // u32, u64, ErrorRecord and the memory-order primitives

#ifndef DISTRIB_IPC_MAX_RANKS
#define DISTRIB_IPC_MAX_RANKS 16
#endif
#ifndef DISTRIB_IPC_LANES
#define DISTRIB_IPC_LANES 8
#endif

namespace distrib {
namespace ipc {

constexpr int kMaxRanks = DISTRIB_IPC_MAX_RANKS;
constexpr int kLanes = DISTRIB_IPC_LANES;
constexpr int kDepth = 2;
constexpr u64 kMinChunk = 4096;
constexpr int kHeaderBytes = 16;

// At the start of each rank's IPC allocation; zeroed once at creation.
struct Mailbox {
  u32 ready[kMaxRanks][kLanes];  // chunks sender p has published to this rank (written by p)
  u32 freed[kMaxRanks][kLanes];  // chunks this rank sent to p that p has copied out (written by p)
  u32 sent[kMaxRanks][kLanes];   // chunks this rank has published to p (its own)
  u32 taken[kMaxRanks][kLanes];  // chunks this rank has copied out from p (its own)
  u32 p2p_check[kMaxRanks][4];   // P2P write test scratch
  u32 poison;                    // 0, or the mark of the rank that stopped the communicator
};

// Before every chunk in a slot: what the sender sent, so that the receiver
// can tell a message of another size or type from its own.
struct Header {
  u64 nbytes;  // the whole message's size
  u32 chunk;   // this chunk's index in the message
  u32 dtype;   // the sender's element type (a code the host chooses)
};
static_assert(sizeof(Header) == kHeaderBytes, "Header is one 16-byte pack");

// Why a call gave up (ErrorRecord::kind).
enum IpcErrorKind : u32 {
  kSendTimeout = 1,  // `who`: the receiver that did not free a slot within timeout_ns
  kPoisoned = 2,     // `who`: the poison mark of the rank that stopped the communicator
  kRecvTimeout = 3,  // `who`: the sender whose chunk did not arrive within timeout_ns
  kMismatch = 4,     // `who`: the sender; unused[0..1]: its message's size, unused[2]: its dtype
};

// Per-communicator constants (device memory, written once by the host).
struct IpcContext {
  Mailbox* self;
  Mailbox* mailboxes[kMaxRanks];  // every rank's Mailbox, self included
  char* slots[kMaxRanks];         // every rank's slot region
  ErrorRecord* error;             // host-mapped
  u64 timeout_ns;
  int rank;
  int world;
  int chunk_bytes;                // a multiple of 16
  int unused;
};

// The chunk size of an n-byte message (both sides compute it alike).
__host__ __device__ __forceinline__ u64 chunk_size(u64 nbytes, int chunk_bytes) {
  u64 per_lane = (nbytes + kLanes - 1) / kLanes;
  per_lane = (per_lane + 15) & ~(u64)15;
  if (per_lane < kMinChunk) per_lane = kMinChunk;
  return per_lane < (u64)chunk_bytes ? per_lane : (u64)chunk_bytes;
}

// The slot [sender][lane][depth] in rank `owner`'s region.
__device__ __forceinline__ char* slot_of(const IpcContext* ctx, int owner, int sender, int lane, u32 k) {
  const u64 stride = kHeaderBytes + (u64)ctx->chunk_bytes;
  return ctx->slots[owner] + (((u64)sender * kLanes + lane) * kDepth + k % kDepth) * stride;
}

__device__ void record(const IpcContext* ctx, u32 kind, u32 who, u32 call, u64 extra, u32 extra2) {
  ErrorRecord* e = ctx->error;
  if (atomicCAS_system(&e->claim, 0u, 1u) != 0u) return;
  volatile ErrorRecord* v = e;
  v->block = blockIdx.x;
  v->call = call;
  v->kind = kind;
  v->unused[0] = (u32)extra;
  v->unused[1] = (u32)(extra >> 32);
  v->unused[2] = extra2;
  __threadfence_system();  // the fields before the word that says they are there
  v->who_plus_one = who + 1u;
}

// Stops the communicator on every rank with `mark`: the first mark wins
// everywhere, and the poison is visible everywhere before anything this rank
// does next.
__device__ void poison_all(const IpcContext* ctx, u32 mark) {
  for (int p = 0; p < ctx->world; ++p) atomicCAS_system(&ctx->mailboxes[p]->poison, 0u, mark);
  __threadfence_system();
}

// Gives up on `peer` (kind: why), or passes on the poison `found`.
__device__ void stop(const IpcContext* ctx, u32 kind, int peer, u32 call, u32 found, u64 extra = 0,
                     u32 extra2 = 0) {
  if (found) {
    poison_all(ctx, found);
    record(ctx, kPoisoned, found, call, 0, 0);
    return;
  }
  poison_all(ctx, ((u32)ctx->rank + 1u) | (((u32)peer + 1u) << 16));
  record(ctx, kind, (u32)peer, call, extra, extra2);
}

// Thread 0 of a block waits until *counter >= target. False if it gave up
// (or found the communicator stopped); the caller shares that with the block.
__device__ __forceinline__ bool wait_for(const IpcContext* ctx, const u32* counter, u32 target, u64 deadline,
                                         u32 kind, int peer, u32 call) {
  const u32* poison = &ctx->self->poison;
  for (u32 spins = 1; (int)(ld_acquire_sys(counter) - target) < 0; ++spins) {
    if ((spins & 15u) != 0u) continue;
    const u32 mark = ld_volatile(poison);
    if (mark) {
      stop(ctx, kind, peer, call, mark);
      return false;
    }
    if (global_timer_ns() > deadline) {
      stop(ctx, kind, peer, call, 0u);
      return false;
    }
  }
  return true;
}

// True (for the whole block) if the communicator is not stopped; one thread
// reads the poison word, so that every thread of the block takes the same way.
__device__ __forceinline__ bool entry_check(const IpcContext* ctx, int peer, u32 call) {
  __shared__ u32 found;
  if (threadIdx.x == 0) {
    found = ctx->self->poison;
    if (found) stop(ctx, kPoisoned, peer, call, found);
  }
  __syncthreads();
  return found == 0u;
}

// Copies n bytes with the widest access both addresses allow; `from_slot`
// reads through L2 only (the slot is rewritten by a peer between uses).
__device__ __forceinline__ void copy_bytes(char* dst, const char* src, u64 n, bool from_slot) {
  const unsigned long long align = (unsigned long long)dst | (unsigned long long)src;
  u64 done = 0;
  if ((align & 15u) == 0u) {
    const u64 packs = n / 16;
    uint4* d = reinterpret_cast<uint4*>(dst);
    const uint4* s = reinterpret_cast<const uint4*>(src);
    for (u64 i = threadIdx.x; i < packs; i += blockDim.x) d[i] = from_slot ? __ldcg(s + i) : s[i];
    done = packs * 16;
  } else if ((align & 3u) == 0u) {
    const u64 words = n / 4;
    u32* d = reinterpret_cast<u32*>(dst);
    const u32* s = reinterpret_cast<const u32*>(src);
    for (u64 i = threadIdx.x; i < words; i += blockDim.x) d[i] = from_slot ? __ldcg(s + i) : s[i];
    done = words * 4;
  }
  for (u64 i = done + threadIdx.x; i < n; i += blockDim.x)
    dst[i] = from_slot ? (char)__ldcg(reinterpret_cast<const unsigned char*>(src + i)) : src[i];
}

// Sends `nbytes` at `src` (this rank's memory) to rank `peer`. Grid: one
// block per lane that carries a chunk (min(kLanes, chunks)).
__global__ void __launch_bounds__(512) send(const IpcContext* __restrict__ ctx, int peer,
                                            const char* __restrict__ src, u64 nbytes, u32 dtype, u32 call) {
  const int lane = blockIdx.x;
  const u64 chunk = chunk_size(nbytes, ctx->chunk_bytes);
  const u64 chunks = (nbytes + chunk - 1) / chunk;
  Mailbox* self = ctx->self;
  u32 k = self->sent[peer][lane];
  const u64 deadline = global_timer_ns() + ctx->timeout_ns;
  // A stopped rank sends nothing more (its own stop was written by an earlier
  // kernel of its own stream, so a plain load sees it).
  bool ok = entry_check(ctx, peer, call);
  for (u64 i = lane; i < chunks && ok; i += kLanes, ++k) {
    bool gave_up = false;
    if (threadIdx.x == 0)
      gave_up = !wait_for(ctx, &self->freed[peer][lane], k + 1u - kDepth, deadline, kSendTimeout, peer, call);
    if (__syncthreads_or(gave_up)) {
      ok = false;
      break;
    }
    char* slot = slot_of(ctx, peer, ctx->rank, lane, k);
    const u64 begin = i * chunk, n = min(chunk, nbytes - begin);
    copy_bytes(slot + kHeaderBytes, src + begin, n, false);
    if (threadIdx.x == 0) {
      Header h{nbytes, (u32)i, dtype};
      *reinterpret_cast<Header*>(slot) = h;
    }
    // Every thread's stores to the slot are done before the chunk is published.
    __syncthreads();
    if (threadIdx.x == 0) arrive_release_sys(&ctx->mailboxes[peer]->ready[ctx->rank][lane], k + 1u);
  }
  if (threadIdx.x == 0 && ok) self->sent[peer][lane] = k;
}

// Receives `nbytes` from rank `peer` into `dst` (this rank's memory).
__global__ void __launch_bounds__(512) recv(const IpcContext* __restrict__ ctx, int peer,
                                            char* __restrict__ dst, u64 nbytes, u32 dtype, u32 call) {
  const int lane = blockIdx.x;
  const u64 chunk = chunk_size(nbytes, ctx->chunk_bytes);
  const u64 chunks = (nbytes + chunk - 1) / chunk;
  Mailbox* self = ctx->self;
  u32 k = self->taken[peer][lane];
  const u64 deadline = global_timer_ns() + ctx->timeout_ns;
  bool ok = entry_check(ctx, peer, call);
  for (u64 i = lane; i < chunks && ok; i += kLanes, ++k) {
    bool gave_up = false;
    const char* slot = slot_of(ctx, ctx->rank, peer, lane, k);
    if (threadIdx.x == 0) {
      gave_up = !wait_for(ctx, &self->ready[peer][lane], k + 1u, deadline, kRecvTimeout, peer, call);
      if (!gave_up) {
        const uint4 raw = __ldcg(reinterpret_cast<const uint4*>(slot));
        const Header h = *reinterpret_cast<const Header*>(&raw);
        if (h.nbytes != nbytes || h.chunk != (u32)i || h.dtype != dtype) {
          stop(ctx, kMismatch, peer, call, 0u, h.nbytes, h.dtype);
          gave_up = true;
        }
      }
    }
    if (__syncthreads_or(gave_up)) {
      ok = false;
      break;
    }
    const u64 begin = i * chunk, n = min(chunk, nbytes - begin);
    copy_bytes(dst + begin, slot + kHeaderBytes, n, true);
    // Every thread's reads of the slot are done before the sender may reuse it.
    __syncthreads();
    if (threadIdx.x == 0) arrive_release_sys(&ctx->mailboxes[peer]->freed[ctx->rank][lane], k + 1u);
  }
  if (ok) {
    if (threadIdx.x == 0) self->taken[peer][lane] = k;
    return;
  }
  // This block's lanes of the destination become NaN (all-ones bytes).
  for (u64 i = lane; i < chunks; i += kLanes) {
    const u64 begin = i * chunk, n = min(chunk, nbytes - begin);
    for (u64 j = threadIdx.x; j < n; j += blockDim.x) dst[begin + j] = (char)0xFF;
  }
}

// Writes `pattern` into every peer's p2p_check slot for this rank, through
// the IPC mapping (the owner reads it back on the host).
__global__ void write_test(const IpcContext* __restrict__ ctx, u32 pattern) {
  const int peer = threadIdx.x;
  if (peer < ctx->world) ctx->mailboxes[peer]->p2p_check[ctx->rank][0] = pattern ^ (u32)peer;
}

}  // namespace ipc
}  // namespace distrib
