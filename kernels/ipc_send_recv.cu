// Translation unit for the CUDA IPC send/recv kernels.
//
// At run time distrib compiles this file with NVRTC (through CuPy) for the
// device's architecture; the kernels are not templates, so nvcc checks them
// all as they are.
#include "ipc_send_recv.cuh"
