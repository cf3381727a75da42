// Translation unit for the custom all-reduce kernels.
//
// At run time distrib compiles this file with NVRTC (through CuPy) for the
// device's architecture and instantiates only the kernels it needs, by name.
// With DISTRIB_INSTANTIATE_ALL defined (the CI's nvcc check) every
// supported kernel is instantiated, so nvcc type-checks them all.
#include "custom_all_reduce.cuh"

#ifdef DISTRIB_INSTANTIATE_ALL
namespace distrib {
#define DISTRIB_INSTANTIATE(T, N)                                                          \
  template __global__ void one_shot<T, N>(const Context*, const RankData*, const uint4*, \
                                          uint4*, int, unsigned);                                  \
  template __global__ void two_shot<T, N>(const Context*, const RankData*, const uint4*, \
                                          uint4*, int, unsigned);                                  \
  template __global__ void lamport_one_shot<T, N>(const Context*, const RankData*,       \
                                                  const uint4*, uint4*, int, unsigned);           \
  template __global__ void one_shot_norm<T, N>(const Context*, const RankData*, const uint4*,     \
                                               uint4*, int, unsigned, const Norm);                 \
  template __global__ void two_shot_norm<T, N>(const Context*, const RankData*, const uint4*,     \
                                               uint4*, int, unsigned, const Norm);                 \
  template __global__ void lamport_norm<T, N>(const Context*, const RankData*, const uint4*,      \
                                              uint4*, int, unsigned, const Norm);
#define DISTRIB_INSTANTIATE_DTYPES(N) \
  DISTRIB_INSTANTIATE(float, N)       \
  DISTRIB_INSTANTIATE(__half, N)      \
  DISTRIB_INSTANTIATE(__nv_bfloat16, N)
DISTRIB_INSTANTIATE_DTYPES(2)
DISTRIB_INSTANTIATE_DTYPES(4)
DISTRIB_INSTANTIATE_DTYPES(6)
DISTRIB_INSTANTIATE_DTYPES(8)
}  // namespace distrib
#endif
