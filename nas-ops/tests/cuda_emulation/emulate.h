// Runs CUDA kernels on the host, for testing their index arithmetic and reductions on a
// machine without a GPU: each block's threads are real threads (so __syncthreads is a real
// barrier and __shared__ memory is shared), and blocks run one after another (so one static
// array per __shared__ declaration is the block's shared memory). harness.cpp includes it
// before kernels/nas_ops.cu; tests/cuda_emulated.rs builds the harness with g++.
#pragma once
#include <barrier>
#include <cstdio>
#include <thread>
#include <vector>

struct EmuDim3 {
  unsigned x, y, z;
};
inline thread_local EmuDim3 threadIdx{0, 0, 0};
inline thread_local EmuDim3 blockIdx{0, 0, 0};
inline EmuDim3 blockDim{1, 1, 1};
inline EmuDim3 gridDim{1, 1, 1};
inline std::barrier<>* emu_barrier = nullptr;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

inline void __syncthreads() { emu_barrier->arrive_and_wait(); }

// Runs `kernel` as a grid of `grid` blocks of `block` threads.
template <typename F>
void emu_launch(unsigned grid, unsigned block, F kernel) {
  gridDim = {grid, 1, 1};
  blockDim = {block, 1, 1};
  for (unsigned b = 0; b < grid; ++b) {
    std::barrier<> bar((std::ptrdiff_t)block);
    emu_barrier = &bar;
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned t = 0; t < block; ++t) {
      threads.emplace_back([&kernel, t, b] {
        threadIdx = {t, 0, 0};
        blockIdx = {b, 0, 0};
        kernel();
      });
    }
    for (auto& th : threads) th.join();
  }
}
