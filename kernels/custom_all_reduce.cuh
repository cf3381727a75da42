// Custom P2P all-reduce for one node: one-shot and two-shot, bf16 / fp16 / fp32, sum.
//
// Every rank owns one IPC-shared allocation laid out as
//     [ Signal | staging (max_bytes) | scratch (max_bytes) ]
// and has opened every peer's allocation (CUDA IPC), so a kernel on rank r can
// read and write rank p's memory over NVLink with ordinary loads and stores.
//
// Data paths
// - staged (eager calls, in-place calls, captures outside `capture()`): each
//   block first copies its stripe of the input into this rank's staging
//   buffer, so a call is one kernel launch, not a copy plus a kernel;
// - registered (out-of-place calls captured inside `capture()`): peers read the
//   caller's input tensor directly; its IPC address on every rank is written
//   into a RankData slot after the capture ends.
// Either way the kernel reads peer p's input through data->ptrs[p].
//
// Every rank reduces in the fixed order p = 0, 1, …, N-1, accumulating in
// float32, so all ranks produce bitwise the same result.
//
// ---------------------------------------------------------------------------
// The barrier, and why it is correct under the PTX memory model
// ---------------------------------------------------------------------------
// A barrier is per block: block b of rank r meets block b of every peer (all
// ranks launch the same grid for the same call, so block b exists everywhere).
//
// Counters, never flags. Signal::arrive[b][p] on rank r holds the number of
// barriers that block b of rank p has *entered*. Each block keeps its own count
// in Signal::epoch[b] (read at kernel start, written back at kernel end), so a
// barrier's target value is simply "one more than last time". Counters only
// grow; nothing is ever reset to 0. This removes the race of the 0/1 flag
// scheme (seed 000): there, a fast peer could set the next round's flag before
// a slow peer reset the previous one, and the reset then erased a real arrival
// -> a wait that never ends. With monotonic counters a late write can only be
// a smaller number, and waits compare with ">= target" (wrap-safe as a signed
// difference), so an early arrival for the next round also satisfies this one
// and is never lost.
//
// Ordering. Thread p of block b (p < N) does, at barrier k:
//   1. __syncthreads()            every thread of the block has finished its
//                                 stores (staging copy, partial results) and
//                                 its loads of peer memory for this phase;
//   2. fence.acq_rel.sys; st.relaxed.sys  peer_p.arrive[b][r] = k
//   3. ld.acquire.sys  self.arrive[b][p] until >= k   (bounded, see below)
//   4. __syncthreads()            the acquire is published to the whole block.
// (1)+(2): bar.sync orders all of the block's prior accesses before thread p's
// fence, the fence and the store form a release pattern, and a release is
// cumulative, so a peer
// that observes the counter (3, acquire) also observes every store the block
// made before the barrier (its staging copy, its scratch results), at system
// scope, i.e. across the NVLink fabric. Prior *loads* are ordered too: the
// release at the end barrier cannot be observed before this block's reads of
// peer buffers are done, which is what lets a peer overwrite its staging
// buffer in its next call.
// (3)+(4): the acquire load synchronises-with the peer's release; bar.sync
// then extends that to every thread of the block before it touches peer data.
// Data written by earlier kernels on the stream (the caller's input in the
// registered path) precede this kernel in stream order and hence precede the
// release of the start barrier.
// No __threadfence_system() (fence.sc) is needed in the hot path: the
// acq_rel fence and the acquire loads at .sys scope give exactly the pairwise
// ordering required (seed 000 measured ~6 µs for fence.sc on A100). The fence
// is what st.release.sys compiles to anyway (MEMBAR.ALL.SYS before the
// store); written out, it also orders the block's reads before the loads that
// follow the store, which the last barrier's poison read needs (below).
//
// Bounded waits. Each wait spins on %globaltimer and gives up after
// timeout_ns.
//
// ---------------------------------------------------------------------------
// Fail-stop: a call that gave up never passes for a result
// ---------------------------------------------------------------------------
// A block that gives up (a peer did not arrive in time, or a graph replayed
// before its inputs were registered) does three things:
//   1. it stops the communicator: Signal::poison on every rank, itself
//      included, is set to its mark, (1 + its rank) | (1 + the peer it
//      waited for) << 16 (system-scope CAS: the first mark wins), so that
//      every rank can say who gave up on whom; then it fences (system scope);
//   2. it fills the host-mapped error record (first failure in this process
//      wins), which the host's watchdog and every later launch read;
//   3. it writes NaN over its share of the output, so the call's result
//      cannot pass for data (an exact partial result is overwritten too).
// A block that finds the poison set does the same, passing the mark it
// found on. So a rank that has stopped does nothing more (no staging, no
// arrival, no kernel of its caller's) before the poison is visible on every
// rank. Every kernel reads its poison word while it waits; the barrier
// kernels read it again right after posting their first and their last
// arrival, the Lamport kernel before it pushes anything.
//
// Why a barrier kernel's output is not silently wrong: a block keeps its
// output only if its poison word is still clear right after its last
// arrival. That load is ordered after every read the block made of peers'
// memory (bar.sync, then the acq_rel fence of the arrival). While no rank has
// stopped, the barriers pair up and the reads are whole. Once one has, a read
// can only be torn by a write made after some rank stopped: its next call's
// staging, its caller's next write of an input, or a write of a rank that
// got past a barrier early thanks to an arrival that a stopped rank posted
// out of step (a stopped block keeps fewer barrier counts). Every such write
// is causally after that rank passed the poison on and fenced, so if a read
// saw it, the load after it sees the poison (message passing through
// release/acquire and the fence, which are cumulative); if the load sees no
// poison, every read ended before any rank stopped, and the sum is whole.
// The loads are issued beside the first arrival load of the spin, so they
// cost no latency; and since nothing of peers' memory is read before the
// first arrival, no kernel waits for its poison word at entry.
//
// Why a Lamport result is never silently wrong: a stopped rank pushes
// nothing more (each push is predicated on its own poison word, which it set
// itself when it stopped), so peers
// can only read data of calls that rank made before it stopped; a read that
// waits for more sees the poison (or times out) and writes NaN. The rank
// that gave up leaves its own buffer half consumed, but it never reads it
// again: its poison word is set by its own kernel, which precedes every
// later kernel of that rank in stream order.
// ---------------------------------------------------------------------------

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#ifndef DISTRIB_MAX_RANKS
#define DISTRIB_MAX_RANKS 8
#endif
#ifndef DISTRIB_MAX_BLOCKS
#define DISTRIB_MAX_BLOCKS 128
#endif
// The Lamport kernel always runs this many blocks (see lamport_one_shot).
#ifndef DISTRIB_LAMPORT_BLOCKS
#define DISTRIB_LAMPORT_BLOCKS 8
#endif
// 0 compiles the poison checks out (only to measure what they cost; a
// timeout then still ends the call and records the error, nothing more).
#ifndef DISTRIB_FAIL_STOP
#define DISTRIB_FAIL_STOP 1
#endif

namespace distrib {

typedef unsigned int u32;
typedef unsigned long long u64;

constexpr bool kFailStop = DISTRIB_FAIL_STOP != 0;

// Lives at the start of each rank's IPC allocation; zeroed once at creation.
struct Signal {
  u32 arrive[DISTRIB_MAX_BLOCKS][DISTRIB_MAX_RANKS];  // written by peers
  u32 epoch[DISTRIB_MAX_BLOCKS];                      // this rank's own counts
  u32 p2p_check[DISTRIB_MAX_RANKS][4];                // P2P write test scratch
  u32 lamport_calls[DISTRIB_LAMPORT_BLOCKS];          // Lamport calls made, per block
  u32 lamport_copy[DISTRIB_LAMPORT_BLOCKS];           // copy the next Lamport call uses: 0, 1, 2
  u32 poison;                                         // 0, or the mark of the rank that stopped it
};

// Per-call input addresses of every rank (a slot in a device array). A slot
// of a captured call is all zeros until the capture's inputs are registered.
struct RankData {
  const void* ptrs[DISTRIB_MAX_RANKS];
};

// Why a call gave up (ErrorRecord::kind).
enum ErrorKind : u32 {
  kTimeout = 1,       // `who`: the peer that did not arrive within timeout_ns
  kPoisoned = 2,      // `who`: the poison mark of the rank that stopped the communicator
  kUnregistered = 3,  // a graph replayed before its captured inputs were registered (`who`: self)
};

// Host-mapped (pinned) memory: the first failure of a process is recorded here.
struct ErrorRecord {
  u32 who_plus_one;   // written last: non-zero means the fields below are complete
  u32 block;
  u32 call;           // the call's id, as the host passed it to the kernel
  u32 kind;           // ErrorKind
  u32 claim;          // CAS'd 0 -> 1 by the one writer
  u32 unused[3];
};

// Per-communicator constants (device memory, written once by the host).
struct Context {
  Signal* self;
  Signal* signals[DISTRIB_MAX_RANKS];  // every rank's Signal, self included
  void* scratch[DISTRIB_MAX_RANKS];    // every rank's scratch buffer
  ErrorRecord* error;                  // host-mapped
  u64 timeout_ns;
  int rank;
  int lamport_slot_packs;              // capacity of one rank's slot, in 16-byte packs
  // Every rank's Lamport region: [3 rotations][2 sentinel classes][N ranks][slot].
  uint4* lamport[DISTRIB_MAX_RANKS];
};

// A release pattern: every earlier access of this thread (and, after a
// bar.sync, of its block) is ordered before the store, and before any later
// load of this thread.
__device__ __forceinline__ void arrive_release_sys(u32* addr, u32 value) {
  asm volatile("fence.acq_rel.sys;\n\tst.relaxed.sys.global.u32 [%0], %1;" ::"l"(addr), "r"(value)
               : "memory");
}

__device__ __forceinline__ u32 ld_acquire_sys(const u32* addr) {
  u32 value;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(value) : "l"(addr) : "memory");
  return value;
}

__device__ __forceinline__ u64 global_timer_ns() {
  u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ u32 ld_volatile(const u32* addr) {
  u32 value;
  asm volatile("ld.volatile.global.u32 %0, [%1];" : "=r"(value) : "l"(addr) : "memory");
  return value;
}

// Records the first failure of this process in the host-mapped error record.
__device__ void record_error(const Context* ctx, u32 kind, u32 who, u32 call) {
  ErrorRecord* e = ctx->error;
  if (atomicCAS_system(&e->claim, 0u, 1u) != 0u) return;
  volatile ErrorRecord* v = e;
  v->block = blockIdx.x;
  v->call = call;
  v->kind = kind;
  __threadfence_system();  // the fields before the word that says they are there
  v->who_plus_one = who + 1u;
}

// The poison mark of this rank giving up on `waited` (itself for a refused replay).
__device__ __forceinline__ u32 mark_of(const Context* ctx, int waited) {
  return ((u32)ctx->rank + 1u) | (((u32)waited + 1u) << 16);
}

// Stops the communicator on every rank with `mark` (see "Fail-stop" above):
// the first mark wins everywhere, and the poison is visible everywhere before
// anything this rank does next.
template <int N>
__device__ void poison_all(const Context* ctx, u32 mark) {
#pragma unroll
  for (int p = 0; p < N; ++p) atomicCAS_system(&ctx->signals[p]->poison, 0u, mark);
  __threadfence_system();
}

// A call that gave up on `waited` (kind kTimeout or kUnregistered).
template <int N>
__device__ void give_up(const Context* ctx, u32 kind, int waited, u32 call) {
  if (kFailStop) poison_all<N>(ctx, mark_of(ctx, waited));
  record_error(ctx, kind, (u32)waited, call);
}

// A call that found the communicator stopped: passes the mark on.
template <int N>
__device__ void stopped(const Context* ctx, u32 mark, u32 call) {
  poison_all<N>(ctx, mark);
  record_error(ctx, kPoisoned, mark, call);
}

// A wait's periodic look: true (and the communicator passed on or stopped)
// if the poison word is set, or the deadline has passed waiting for `waited`.
template <int N>
__device__ __forceinline__ bool must_stop(const Context* ctx, const u32* poison, u64 deadline, int waited,
                                          u32 call) {
  const u32 mark = kFailStop ? ld_volatile(poison) : 0u;
  if (mark) {
    stopped<N>(ctx, mark, call);
    return true;
  }
  if (global_timer_ns() > deadline) {
    give_up<N>(ctx, kTimeout, waited, call);
    return true;
  }
  return false;
}

// This block's share of the output becomes NaN (all-ones words are NaN in
// float32, float16 and bfloat16 alike).
__device__ __forceinline__ void poison_output(uint4* out, int packs) {
  const uint4 nan = make_uint4(0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu);
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < packs; i += gridDim.x * blockDim.x) out[i] = nan;
}

// What thread p < N of a block needs for its barriers with peer p. Loaded
// at kernel entry, so that these loads overlap each other (and the staging
// copy) instead of lining up in front of the first arrival.
struct Link {
  u32* out;            // peer p's arrive[block][rank]: this block's arrivals
  const u32* in;       // this rank's arrive[block][p]: peer p's arrivals
  const u32* poison;   // this rank's poison word
  bool empty;          // a registered call whose input slot for peer p is empty
};

template <int N>
__device__ __forceinline__ Link link(const Context* ctx, const RankData* data) {
  Link l{};
  if (threadIdx.x < N) {
    const int peer = threadIdx.x;
    Signal* self = ctx->self;
    l.poison = &self->poison;
    l.empty = kFailStop && data->ptrs[peer] == nullptr;
    l.out = &ctx->signals[peer]->arrive[blockIdx.x][ctx->rank];
    l.in = &self->arrive[blockIdx.x][peer];
  }
  return l;
}

enum BarrierKind { kFirst, kMiddle, kLast };

// A block's barrier. Returns false (for the whole block) if the call must
// stop: a peer did not arrive in time, the communicator is stopped (seen
// while waiting or, at the first and last barrier, right after arriving), or
// (first barrier) the call's input slot is empty. Nothing of peers' memory
// has been read before the first barrier, so an empty slot is refused in time.
template <int N, BarrierKind kKind>
__device__ __forceinline__ bool barrier(const Context* ctx, const Link& link, u32 target, u64 deadline,
                                        u32 call) {
  // Every thread's stores (staging, partial results) and peer loads of this
  // phase are done before any arrival is published.
  __syncthreads();
  bool stop = false;
  if (threadIdx.x < N) {
    const int peer = threadIdx.x;
    arrive_release_sys(link.out, target);
    // The poison as it is once this block's reads are done (see "Fail-stop"
    // above); issued beside the first arrival load.
    const u32 late = kFailStop && kKind != kMiddle ? ld_volatile(link.poison) : 0u;
    for (u32 spins = 1; (int)(ld_acquire_sys(link.in) - target) < 0; ++spins) {
      if ((spins & 15u) == 0u && must_stop<N>(ctx, link.poison, deadline, peer, call)) {
        stop = true;
        break;
      }
    }
    if (!stop && late) {
      stopped<N>(ctx, late, call);
      stop = true;
    } else if (!stop && kKind == kFirst && link.empty) {
      give_up<N>(ctx, kUnregistered, ctx->rank, call);
      stop = true;
    }
  }
  return !__syncthreads_or(stop);
}

#ifdef DISTRIB_TEST_STALL_NS
// Tests only: rank DISTRIB_TEST_STALL_RANK's kernels of call
// DISTRIB_TEST_STALL_CALL stall here, between two barriers, for
// DISTRIB_TEST_STALL_NS (a peer that stalls mid-call).
__device__ __forceinline__ void test_stall(const Context* ctx, u32 call) {
  if (ctx->rank != DISTRIB_TEST_STALL_RANK || call != (u32)DISTRIB_TEST_STALL_CALL) return;
  const u64 until = global_timer_ns() + (u64)DISTRIB_TEST_STALL_NS;
  while (global_timer_ns() < until) __nanosleep(1000);
}
#else
__device__ __forceinline__ void test_stall(const Context*, u32) {}
#endif

// ---------------------------------------------------------------------------
// Float arithmetic that keeps subnormals
// ---------------------------------------------------------------------------
// CuPy compiles every NVRTC program with -ftz=true, which makes each float32
// `+`, `*` and sqrt of this file flush subnormal inputs and results to zero:
// 2.9e-39 + 0.0 came back 0.0 in float32 and bfloat16 (whose range is
// float32's), where PyTorch's sum keeps 2.9e-39. The reductions and the norm
// therefore spell their arithmetic out in PTX, whose instructions without
// .ftz keep subnormals whatever the compiler flags say. Round to nearest
// even, as IEEE 754 and PyTorch do; not volatile, so the compiler still
// schedules them freely (an add is an add: this costs nothing).
__device__ __forceinline__ float add_rn(float a, float b) {
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float mul_rn(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float fma_rn(float a, float b, float c) {
  float r;
  asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(r) : "f"(a), "f"(b), "f"(c));
  return r;
}
__device__ __forceinline__ float div_rn(float a, float b) {
  float r;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
// 1 / sqrt(x), each step correctly rounded (rsqrt.approx would be 2 ulp off).
__device__ __forceinline__ float rsqrt_rn(float x) {
  float r;
  asm("sqrt.rn.f32 %0, %1;" : "=f"(r) : "f"(x));
  return div_rn(1.0f, r);
}

// 16 bytes of T, reduced in float.
template <typename T> struct Pack;
template <> struct Pack<float> {
  static constexpr int n = 4;
  __device__ static void load(const uint4& v, float* f) {
    f[0] = __uint_as_float(v.x); f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z); f[3] = __uint_as_float(v.w);
  }
  __device__ static uint4 store(const float* f) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]),
                      __float_as_uint(f[3]));
  }
};
template <> struct Pack<__half> {
  static constexpr int n = 8;
  __device__ static void load(const uint4& v, float* f) {
    const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 x = __half22float2(h[i]);
      f[2 * i] = x.x; f[2 * i + 1] = x.y;
    }
  }
  __device__ static uint4 store(const float* f) {
    uint4 v;
    __half2* h = reinterpret_cast<__half2*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
    return v;
  }
};
template <> struct Pack<__nv_bfloat16> {
  static constexpr int n = 8;
  __device__ static void load(const uint4& v, float* f) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 x = __bfloat1622float2(h[i]);
      f[2 * i] = x.x; f[2 * i + 1] = x.y;
    }
  }
  __device__ static uint4 store(const float* f) {
    uint4 v;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    return v;
  }
};

// Sum of pack `idx` over ranks 0..N-1, in that order.
template <typename T, int N>
__device__ __forceinline__ uint4 reduce_pack(const RankData* data, int idx) {
  float acc[Pack<T>::n], x[Pack<T>::n];
  Pack<T>::load(reinterpret_cast<const uint4*>(data->ptrs[0])[idx], acc);
#pragma unroll
  for (int p = 1; p < N; ++p) {
    Pack<T>::load(reinterpret_cast<const uint4*>(data->ptrs[p])[idx], x);
#pragma unroll
    for (int i = 0; i < Pack<T>::n; ++i) acc[i] = add_rn(acc[i], x[i]);
  }
  return Pack<T>::store(acc);
}

// Copies input packs [begin, end) into this rank's staging buffer, striped
// over blocks exactly as the reads that follow the next barrier are.
__device__ __forceinline__ void stage_input(const Context* ctx, const RankData* data,
                                            const uint4* in, int begin, int end) {
  if (in == nullptr) return;  // registered path: peers read the caller's tensor
  uint4* staging = reinterpret_cast<uint4*>(const_cast<void*>(data->ptrs[ctx->rank]));
  for (int i = begin + blockIdx.x * blockDim.x + threadIdx.x; i < end; i += gridDim.x * blockDim.x)
    staging[i] = in[i];
}

// One-shot: every rank reads all of every peer's input and reduces it all.
// Best for small messages: one data round, N-1 remote reads per element.
template <typename T, int N>
__global__ void __launch_bounds__(512) one_shot(const Context* __restrict__ ctx,
                                                const RankData* __restrict__ data,
                                                const uint4* __restrict__ in,
                                                uint4* __restrict__ out, int packs, u32 call) {
  const Link l = link<N>(ctx, data);
  u32 epoch = ctx->self->epoch[blockIdx.x];
  const u64 deadline = global_timer_ns() + ctx->timeout_ns;
  stage_input(ctx, data, in, 0, packs);
  bool ok = barrier<N, kFirst>(ctx, l, ++epoch, deadline, call);
  if (ok) {
    test_stall(ctx, call);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < packs; i += gridDim.x * blockDim.x)
      out[i] = reduce_pack<T, N>(data, i);
    // Nobody may overwrite its staging buffer (next call) or its input
    // (the caller's next kernel) until every peer has finished reading it.
    ok = barrier<N, kLast>(ctx, l, ++epoch, deadline, call);
  }
  if (kFailStop && !ok) poison_output(out, packs);
  if (threadIdx.x == 0) ctx->self->epoch[blockIdx.x] = epoch;
}

// Two-shot: reduce-scatter (rank r reduces chunk r into its scratch buffer),
// then all-gather (every rank copies chunk p from rank p's scratch).
// Each element crosses the fabric twice instead of N-1 times.
template <typename T, int N>
__global__ void __launch_bounds__(512) two_shot(const Context* __restrict__ ctx,
                                                const RankData* __restrict__ data,
                                                const uint4* __restrict__ in,
                                                uint4* __restrict__ out, int packs, u32 call) {
  const Link l = link<N>(ctx, data);
  u32 epoch = ctx->self->epoch[blockIdx.x];
  const u64 deadline = global_timer_ns() + ctx->timeout_ns;
  const int part = (packs + N - 1) / N;
  const int rank = ctx->rank;
  // Stage chunk by chunk with chunk-relative striping: the block that copies
  // element i is then the block that peers' block of the same index reads it
  // with, which is what a per-block barrier can vouch for.
  for (int c = 0; c < N; ++c) stage_input(ctx, data, in, c * part, min((c + 1) * part, packs));
  bool ok = barrier<N, kFirst>(ctx, l, ++epoch, deadline, call);
  if (ok) {
    {
      const int begin = rank * part, end = min(begin + part, packs);
      uint4* scratch = reinterpret_cast<uint4*>(ctx->scratch[rank]);
      for (int i = begin + blockIdx.x * blockDim.x + threadIdx.x; i < end; i += gridDim.x * blockDim.x) {
        const uint4 v = reduce_pack<T, N>(data, i);
        scratch[i] = v;
        out[i] = v;
      }
    }
    ok = barrier<N, kMiddle>(ctx, l, ++epoch, deadline, call);
    if (ok) {
      test_stall(ctx, call);
#pragma unroll
      for (int step = 1; step < N; ++step) {
        const int p = (rank + step) % N;  // spread the reads over peers
        const int begin = p * part, end = min(begin + part, packs);
        const uint4* scratch = reinterpret_cast<const uint4*>(ctx->scratch[p]);
        for (int i = begin + blockIdx.x * blockDim.x + threadIdx.x; i < end; i += gridDim.x * blockDim.x)
          out[i] = scratch[i];
      }
      // Scratch and inputs stay untouched until every peer has copied out.
      ok = barrier<N, kLast>(ctx, l, ++epoch, deadline, call);
    }
  }
  if (kFailStop && !ok) poison_output(out, packs);
  if (threadIdx.x == 0) ctx->self->epoch[blockIdx.x] = epoch;
}

// ---------------------------------------------------------------------------
// Lamport one-shot: no barrier at all
// ---------------------------------------------------------------------------
// Each rank *pushes* its input into slot `rank` of every peer's Lamport
// buffer, then reduces its own buffer as the data lands. Readiness travels
// with the data: the buffer is pre-filled with a sentinel (-0.0 in every
// element) that no input can carry, because inputs' -0.0 is written as +0.0
// (which changes no sum's value). A reader requests every peer's pack at
// once, then re-reads only those that still hold a sentinel element (one
// peer at a time, each load would wait for the one before); aligned 32-bit
// stores are single-copy atomic, so an element is either the sentinel or the
// final value, never a mix.
//
// Reuse: the buffer rotates over 3 copies (call k uses copy k mod 3), and the
// owner re-fills each pack with the sentinel right after reading it. A peer
// writes copy c again only at call k + 3, which it can reach only after
// receiving this rank's data for calls k + 1 and k + 2, which this rank sends
// after its call k (and the re-fill in it) has finished in stream order.
// That causal chain through the data is what orders the re-fill before the
// peer's next write; the window between them is two whole all-reduces.
//
// The rotation must agree on every rank and in every block, inside CUDA
// graphs too, so it lives in device memory, one per block, and the kernel
// always runs exactly DISTRIB_LAMPORT_BLOCKS blocks. It is kept as the copy
// index itself (0, 1, 2, 0, ...), not derived from a call counter: a 32-bit
// counter's `% 3` repeats a copy where it wraps (2^32 = 1 mod 3), which would
// remove the two calls of slack. The call counter is kept for reports only.
//
// Sentinels: 16-bit types use the word 0x80008000 (-0.0 in both halves),
// float32 uses 0x80000000. The two classes have separate regions, so a
// 16-bit call never leaves a word that a float32 call would misread.

template <typename T> struct Sentinel;
template <> struct Sentinel<float> {
  static constexpr u32 word = 0x80000000u;
  static constexpr int cls = 0;
  __device__ static u32 clean(u32 w) { return w == word ? 0u : w; }
  __device__ static bool empty(u32 w) { return w == word; }
};
template <typename T> struct Sentinel16 {
  static constexpr u32 word = 0x80008000u;
  static constexpr int cls = 1;
  __device__ static u32 clean(u32 w) {
    if ((w & 0xFFFFu) == 0x8000u) w &= 0xFFFF0000u;
    if ((w >> 16) == 0x8000u) w &= 0x0000FFFFu;
    return w;
  }
  __device__ static bool empty(u32 w) { return (w & 0xFFFFu) == 0x8000u || (w >> 16) == 0x8000u; }
};
template <> struct Sentinel<__half> : Sentinel16<__half> {};
template <> struct Sentinel<__nv_bfloat16> : Sentinel16<__nv_bfloat16> {};

__device__ __forceinline__ void st_volatile_v4(uint4* addr, uint4 v) {
  asm volatile("st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(addr), "r"(v.x), "r"(v.y),
               "r"(v.z), "r"(v.w) : "memory");
}

// The same store, made only if `stop` is 0. A predicate rather than a branch:
// the compiler would hoist a branch on the entry poison word out of the push
// loop, and the input loads would then wait for the poison load.
__device__ __forceinline__ void st_volatile_v4_unless(uint4* addr, uint4 v, u32 stop) {
  asm volatile("{\n\t.reg .pred go;\n\tsetp.eq.u32 go, %5, 0;\n\t"
               "@go st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};\n\t}" ::"l"(addr), "r"(v.x),
               "r"(v.y), "r"(v.z), "r"(v.w), "r"(stop) : "memory");
}

__device__ __forceinline__ uint4 ld_volatile_v4(const uint4* addr) {
  uint4 v;
  asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(addr) : "memory");
  return v;
}

// What every Lamport kernel reads of its rank's state at entry.
template <typename T, int N>
struct LamportCall {
  u32 poisoned;  // this rank's poison word, read by the threads that push
  u32 rotation;  // the copy this call uses: 0, 1, 2
  u32 calls;     // Lamport calls made by this block (thread 0 only; for reports)
  uint4* mine;   // this call's copy of this rank's buffer, slot 0
  long slot;     // one rank's slot, in packs
  u64 deadline;

  // Pushes this rank's input (packs striped over the whole grid) into slot
  // `rank` of every peer's copy.
  __device__ __forceinline__ void push(const Context* ctx, const uint4* in, int packs) {
    typedef Sentinel<T> S;
    const long copy = ((long)rotation * 2 + S::cls) * N * slot;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < packs; i += gridDim.x * blockDim.x) {
      uint4 v = in[i];
      v = make_uint4(S::clean(v.x), S::clean(v.y), S::clean(v.z), S::clean(v.w));
#pragma unroll
      for (int p = 0; p < N; ++p) {
        uint4* dst = ctx->lamport[p] + copy + ctx->rank * slot + i;
        // A stopped communicator publishes nothing more.
        if (kFailStop) st_volatile_v4_unless(dst, v, poisoned);
        else st_volatile_v4(dst, v);
      }
    }
  }

  // Waits until pack i of every rank has landed here, sums them in rank
  // order into `sum` and re-fills the sentinel. False if the call must stop.
  __device__ __forceinline__ bool take(const Context* ctx, int i, u32 call, uint4& sum) {
    typedef Sentinel<T> S;
    // Every peer's pack is requested at once; most have landed by now.
    uint4 v[N];
#pragma unroll
    for (int p = 0; p < N; ++p) v[p] = ld_volatile_v4(mine + p * slot + i);
    // Spin, re-reading only the packs that have not landed yet.
    for (u32 spins = 1;; ++spins) {
      int late = -1;  // the lowest peer still missing
#pragma unroll
      for (int p = N - 1; p >= 0; --p) {
        if (S::empty(v[p].x) || S::empty(v[p].y) || S::empty(v[p].z) || S::empty(v[p].w)) {
          late = p;
          v[p] = ld_volatile_v4(mine + p * slot + i);
        }
      }
      if (late < 0) break;
      if ((spins & 1023u) == 0u && must_stop<N>(ctx, &ctx->self->poison, deadline, late, call)) return false;
    }
    float acc[Pack<T>::n], x[Pack<T>::n];
    Pack<T>::load(v[0], acc);
#pragma unroll
    for (int p = 1; p < N; ++p) {
      Pack<T>::load(v[p], x);
#pragma unroll
      for (int e = 0; e < Pack<T>::n; ++e) acc[e] = add_rn(acc[e], x[e]);
    }
    sum = Pack<T>::store(acc);
    const uint4 empty = make_uint4(S::word, S::word, S::word, S::word);
#pragma unroll
    for (int p = 0; p < N; ++p) mine[p * slot + i] = empty;
    return true;
  }

  // The rotation moves on (every block, once per call, stopped or not).
  __device__ __forceinline__ void finish(const Context* ctx) {
    __syncthreads();
    if (threadIdx.x == 0) {
      ctx->self->lamport_calls[blockIdx.x] = calls + 1u;
      ctx->self->lamport_copy[blockIdx.x] = rotation == 2u ? 0u : rotation + 1u;
    }
  }
};

template <typename T, int N>
__device__ __forceinline__ LamportCall<T, N> lamport_call(const Context* ctx) {
  LamportCall<T, N> c;
  // Read by every thread (the fused kernel's blocks read rows that other
  // blocks push). A plain load (it shares a cache line with
  // the rotation, so it costs nothing): what must be seen here is only this
  // rank's own stop, and a rank that stopped has itself passed the poison on
  // (CAS into its own word, then a fence) in an earlier kernel of its stream,
  // whose writes every later kernel sees. Another rank's poison that this
  // rank has not seen yet does not make its pushes unsafe: it is still in
  // step, and the spin in take() sees the poison.
  c.poisoned = kFailStop ? ctx->self->poison : 0u;
  c.rotation = ctx->self->lamport_copy[blockIdx.x];
  c.calls = threadIdx.x == 0 ? ctx->self->lamport_calls[blockIdx.x] : 0u;
  c.slot = ctx->lamport_slot_packs;
  // Slot 0 of this call's copy, for this sentinel class.
  c.mine = ctx->lamport[ctx->rank] + ((long)c.rotation * 2 + Sentinel<T>::cls) * N * c.slot;
  return c;
}

template <typename T, int N>
__global__ void __launch_bounds__(512) lamport_one_shot(const Context* __restrict__ ctx,
                                                        const RankData* __restrict__ unused,
                                                        const uint4* __restrict__ in,
                                                        uint4* __restrict__ out, int packs, u32 call) {
  LamportCall<T, N> c = lamport_call<T, N>(ctx);
  c.push(ctx, in, packs);
  c.deadline = global_timer_ns() + ctx->timeout_ns;
  bool ok = c.poisoned == 0u;
  if (!ok) stopped<N>(ctx, c.poisoned, call);
  const int first = blockIdx.x * blockDim.x + threadIdx.x, stride = gridDim.x * blockDim.x;
  for (int i = first; i < packs && ok; i += stride) {
    uint4 sum;
    ok = c.take(ctx, i, call, sum);
    if (ok) out[i] = sum;
  }
  // A thread that stopped leaves NaN in all of its packs (exact ones included).
  if (kFailStop && !ok) {
    const uint4 nan = make_uint4(0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu);
    for (int i = first; i < packs; i += stride) out[i] = nan;
  }
  c.finish(ctx);
}

// ---------------------------------------------------------------------------
// Fused: all-reduce, residual add and RMSNorm in one kernel
// ---------------------------------------------------------------------------
// For [rows, hidden] tensors:  residual += all_reduce(in);
//                               out = residual * rsqrt(mean(residual^2) + eps) * weight.
// The all-reduced value is rounded to T before the add, exactly as an
// all_reduce followed by PyTorch's `residual += x` rounds it, so residual_out
// is bitwise what the unfused sequence gives, and the same on every rank. The
// norm works in float32 on the rounded residual: the row's sum of squares (a
// fixed tree over the block's threads, so the same on every rank), then
// out = round(r * rstd * w), one rounding. A block owns whole rows: its row's
// sum of squares is a block reduction, and (barrier kernels) the rows a
// block stages are the rows peers' block of the same index reads.
//
// Two-shot splits by rows: rank r reduces and normalises rows
// [r * part, (r + 1) * part), puts both results in its scratch buffer (the
// host makes sure both fit), and every rank copies the other rows from their
// owners. So each row's residual comes from the rank that reduced it:
// residual must be the same on every rank, as in tensor parallelism.
//
// Fail-stop as in the unfused kernels: a block that stops leaves NaN in both
// outputs of all of its rows.

struct Norm {
  const uint4* residual_in;
  uint4* residual_out;  // residual_in for the in-place form
  const uint4* weight;  // [row_packs]
  int row_packs;        // 16-byte packs per row
  float eps;
};

// The sum of v over the block, in every thread. The xor butterfly leaves
// bitwise the same value in every lane (a + b == b + a), and the tree is
// the same on every rank.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = add_rn(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();  // every thread has read the last row's sums
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = lane < (int)(blockDim.x >> 5) ? warp_sums[lane] : 0.0f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = add_rn(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  return v;
}

// Pass 1 for pack i: residual_out[i] = round(residual_in[i] + reduced);
// returns sq plus the squares of the rounded values.
template <typename T>
__device__ __forceinline__ float add_residual(const Norm& norm, int i, const uint4& reduced, float sq) {
  float a[Pack<T>::n], r[Pack<T>::n];
  Pack<T>::load(reduced, a);
  Pack<T>::load(norm.residual_in[i], r);
#pragma unroll
  for (int e = 0; e < Pack<T>::n; ++e) r[e] = add_rn(r[e], a[e]);
  const uint4 rounded = Pack<T>::store(r);
  norm.residual_out[i] = rounded;
  Pack<T>::load(rounded, r);
#pragma unroll
  for (int e = 0; e < Pack<T>::n; ++e) sq = fma_rn(r[e], r[e], sq);
  return sq;
}

template <typename T>
__device__ __forceinline__ float row_rstd(const Norm& norm, float sum_of_squares) {
  return rsqrt_rn(add_rn(div_rn(sum_of_squares, (float)(norm.row_packs * Pack<T>::n)), norm.eps));
}

// Pass 2 for pack i, column pack j: out[i] = round(residual_out[i] * rstd * weight[j]).
// residual_out[i] was written by this same thread in pass 1.
template <typename T>
__device__ __forceinline__ uint4 normalize(const Norm& norm, int i, int j, float rstd) {
  float r[Pack<T>::n], w[Pack<T>::n];
  Pack<T>::load(norm.residual_out[i], r);
  Pack<T>::load(norm.weight[j], w);
#pragma unroll
  for (int e = 0; e < Pack<T>::n; ++e) r[e] = mul_rn(mul_rn(r[e], rstd), w[e]);
  return Pack<T>::store(r);
}

// Rows [begin, end) of the input into this rank's staging buffer, a block
// per row, as the reads after the next barrier take them.
__device__ __forceinline__ void stage_rows(const Context* ctx, const RankData* data, const uint4* in,
                                           int begin, int end, int row_packs) {
  if (in == nullptr) return;  // registered path: peers read the caller's tensor
  uint4* staging = reinterpret_cast<uint4*>(const_cast<void*>(data->ptrs[ctx->rank]));
  for (int row = begin + blockIdx.x; row < end; row += gridDim.x)
    for (int j = threadIdx.x; j < row_packs; j += blockDim.x) staging[row * row_packs + j] = in[row * row_packs + j];
}

// NaN in both outputs of this block's rows of [begin, end).
__device__ __forceinline__ void poison_rows(uint4* out, const Norm& norm, int begin, int end) {
  const uint4 nan = make_uint4(0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu);
  for (int row = begin + blockIdx.x; row < end; row += gridDim.x)
    for (int j = threadIdx.x; j < norm.row_packs; j += blockDim.x) {
      out[row * norm.row_packs + j] = nan;
      norm.residual_out[row * norm.row_packs + j] = nan;
    }
}

// Reduces, adds and normalises rows [begin, end) (a block per row); each
// normalised pack also goes to `copy` (and its residual to `copy + packs`) when given.
template <typename T, int N>
__device__ __forceinline__ void reduce_rows(const RankData* data, uint4* out, const Norm& norm, int begin,
                                            int end, uint4* copy, int packs) {
  for (int row = begin + blockIdx.x; row < end; row += gridDim.x) {
    const int base = row * norm.row_packs;
    float sq = 0.0f;
    for (int j = threadIdx.x; j < norm.row_packs; j += blockDim.x)
      sq = add_residual<T>(norm, base + j, reduce_pack<T, N>(data, base + j), sq);
    const float rstd = row_rstd<T>(norm, block_sum(sq));
    for (int j = threadIdx.x; j < norm.row_packs; j += blockDim.x) {
      const uint4 v = normalize<T>(norm, base + j, j, rstd);
      out[base + j] = v;
      if (copy != nullptr) {
        copy[base + j] = v;
        copy[packs + base + j] = norm.residual_out[base + j];
      }
    }
  }
}

template <typename T, int N>
__global__ void __launch_bounds__(512) one_shot_norm(const Context* __restrict__ ctx,
                                                     const RankData* __restrict__ data,
                                                     const uint4* __restrict__ in,
                                                     uint4* __restrict__ out, int packs, u32 call,
                                                     const Norm norm) {
  const Link l = link<N>(ctx, data);
  u32 epoch = ctx->self->epoch[blockIdx.x];
  const u64 deadline = global_timer_ns() + ctx->timeout_ns;
  const int rows = packs / norm.row_packs;
  stage_rows(ctx, data, in, 0, rows, norm.row_packs);
  bool ok = barrier<N, kFirst>(ctx, l, ++epoch, deadline, call);
  if (ok) {
    test_stall(ctx, call);
    reduce_rows<T, N>(data, out, norm, 0, rows, nullptr, packs);
    ok = barrier<N, kLast>(ctx, l, ++epoch, deadline, call);
  }
  if (kFailStop && !ok) poison_rows(out, norm, 0, rows);
  if (threadIdx.x == 0) ctx->self->epoch[blockIdx.x] = epoch;
}

template <typename T, int N>
__global__ void __launch_bounds__(512) two_shot_norm(const Context* __restrict__ ctx,
                                                     const RankData* __restrict__ data,
                                                     const uint4* __restrict__ in,
                                                     uint4* __restrict__ out, int packs, u32 call,
                                                     const Norm norm) {
  const Link l = link<N>(ctx, data);
  u32 epoch = ctx->self->epoch[blockIdx.x];
  const u64 deadline = global_timer_ns() + ctx->timeout_ns;
  const int rows = packs / norm.row_packs;
  const int part = (rows + N - 1) / N;  // rows per rank
  const int rank = ctx->rank;
  for (int c = 0; c < N; ++c) stage_rows(ctx, data, in, c * part, min((c + 1) * part, rows), norm.row_packs);
  bool ok = barrier<N, kFirst>(ctx, l, ++epoch, deadline, call);
  if (ok) {
    reduce_rows<T, N>(data, out, norm, rank * part, min((rank + 1) * part, rows),
                      reinterpret_cast<uint4*>(ctx->scratch[rank]), packs);
    ok = barrier<N, kMiddle>(ctx, l, ++epoch, deadline, call);
    if (ok) {
      test_stall(ctx, call);
#pragma unroll
      for (int step = 1; step < N; ++step) {
        const int p = (rank + step) % N;  // spread the reads over peers
        const uint4* scratch = reinterpret_cast<const uint4*>(ctx->scratch[p]);
        for (int row = p * part + blockIdx.x; row < min((p + 1) * part, rows); row += gridDim.x)
          for (int j = threadIdx.x; j < norm.row_packs; j += blockDim.x) {
            const int i = row * norm.row_packs + j;
            out[i] = scratch[i];
            norm.residual_out[i] = scratch[packs + i];
          }
      }
      // Scratch and inputs stay untouched until every peer has copied out.
      ok = barrier<N, kLast>(ctx, l, ++epoch, deadline, call);
    }
  }
  if (kFailStop && !ok) poison_rows(out, norm, 0, rows);
  if (threadIdx.x == 0) ctx->self->epoch[blockIdx.x] = epoch;
}

template <typename T, int N>
__global__ void __launch_bounds__(512) lamport_norm(const Context* __restrict__ ctx,
                                                    const RankData* __restrict__ unused,
                                                    const uint4* __restrict__ in,
                                                    uint4* __restrict__ out, int packs, u32 call,
                                                    const Norm norm) {
  LamportCall<T, N> c = lamport_call<T, N>(ctx);
  c.push(ctx, in, packs);
  c.deadline = global_timer_ns() + ctx->timeout_ns;
  const int rows = packs / norm.row_packs;
  bool ok = c.poisoned == 0u;
  if (!ok) stopped<N>(ctx, c.poisoned, call);
  // `ok` is the block's: a row's norm needs every thread of the block.
  ok = !__syncthreads_or(!ok);
  for (int row = blockIdx.x; row < rows && ok; row += gridDim.x) {
    const int base = row * norm.row_packs;
    float sq = 0.0f;
    bool mine = true;
    for (int j = threadIdx.x; j < norm.row_packs && mine; j += blockDim.x) {
      uint4 sum;
      mine = c.take(ctx, base + j, call, sum);
      if (mine) sq = add_residual<T>(norm, base + j, sum, sq);
    }
    ok = !__syncthreads_or(!mine);
    if (!ok) break;
    const float rstd = row_rstd<T>(norm, block_sum(sq));
    for (int j = threadIdx.x; j < norm.row_packs; j += blockDim.x) out[base + j] = normalize<T>(norm, base + j, j, rstd);
  }
  if (kFailStop && !ok) poison_rows(out, norm, 0, rows);
  c.finish(ctx);
}

// Writes `pattern` into every peer's p2p_check slot for this rank, through
// the IPC mapping (the owner reads it back on the host).
__global__ void p2p_write_test(const Context* __restrict__ ctx, int n, u32 pattern) {
  const int peer = threadIdx.x;
  if (peer < n) ctx->signals[peer]->p2p_check[ctx->rank][0] = pattern ^ (u32)peer;
}

}  // namespace distrib
