// A command-line front to the emulated kernels (f64 versions): `harness KERNEL` reads the
// integer parameters, then each input array (its length, then its values), from stdin and
// writes each output array (its length, then its values) to stdout. Launch shapes follow
// nas-ops/src/kernels/cuda.rs, with the grids capped small so that the kernels' grid-stride
// loops run more than once.
#include "emulate.h"
// The kernels under test, compiled as host C++ through emulate.h.
#include "../../kernels/nas_ops.cu"

#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

using Vec = std::vector<double>;

static Vec read_vec() {
  long long n;
  std::cin >> n;
  Vec v((size_t)n);
  for (auto& x : v) std::cin >> x;
  return v;
}

static void write_vec(const Vec& v) {
  std::cout.precision(17);
  std::cout << v.size();
  for (double x : v) std::cout << ' ' << x;
  std::cout << '\n';
}

static const unsigned BLOCK = 256;
static unsigned elementwise(long long total) {
  long long blocks = (total + BLOCK - 1) / BLOCK;
  return (unsigned)(blocks < 1 ? 1 : blocks > 3 ? 3 : blocks);
}
static unsigned per_value(long long values) { return (unsigned)(values < 1 ? 1 : values > 4 ? 4 : values); }

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: harness KERNEL < input\n";
    return 2;
  }
  const std::string k = argv[1];
  if (k.rfind("dw_", 0) == 0) {
    DwGeom g;
    int relu;
    std::cin >> g.n >> g.c >> g.h >> g.w >> g.kh >> g.kw >> g.ho >> g.wo >> g.stride >> g.dilation >> g.pad_top >>
        g.pad_left >> relu;
    const long long in = (long long)g.n * g.c * g.h * g.w, out = (long long)g.n * g.c * g.ho * g.wo;
    if (k == "dw_fwd") {
      Vec x = read_vec(), w = read_vec(), y((size_t)out);
      emu_launch(elementwise(out), BLOCK, [&] { dw_fwd_f64(x.data(), w.data(), y.data(), g, relu); });
      write_vec(y);
    } else if (k == "dw_bwd_input") {
      Vec dy = read_vec(), w = read_vec(), dx((size_t)in);
      emu_launch(elementwise(in), BLOCK, [&] { dw_bwd_input_f64(dy.data(), w.data(), dx.data(), g); });
      write_vec(dx);
    } else if (k == "dw_bwd_weight") {
      Vec x = read_vec(), dy = read_vec(), dw((size_t)g.c * g.kh * g.kw);
      emu_launch(per_value((long long)dw.size()), BLOCK,
                 [&] { dw_bwd_weight_f64(x.data(), dy.data(), dw.data(), g, relu); });
      write_vec(dw);
    } else {
      return 2;
    }
  } else if (k.find("pool") != std::string::npos) {
    PoolGeom g;
    std::cin >> g.n >> g.c >> g.h >> g.w >> g.ho >> g.wo >> g.kernel >> g.stride >> g.pad_top >> g.pad_left;
    const long long in = (long long)g.n * g.c * g.h * g.w, out = (long long)g.n * g.c * g.ho * g.wo;
    if (k == "max_pool_fwd" || k == "avg_pool_fwd") {
      Vec x = read_vec(), y((size_t)out);
      const bool max = k == "max_pool_fwd";
      emu_launch(elementwise(out), BLOCK, [&] {
        if (max) max_pool_fwd_f64(x.data(), y.data(), g);
        else avg_pool_fwd_f64(x.data(), y.data(), g);
      });
      write_vec(y);
    } else if (k == "max_pool_bwd") {
      Vec x = read_vec(), dy = read_vec(), dx((size_t)in);
      emu_launch(elementwise(in), BLOCK, [&] { max_pool_bwd_f64(x.data(), dy.data(), dx.data(), g); });
      write_vec(dx);
    } else if (k == "avg_pool_bwd") {
      Vec dy = read_vec(), dx((size_t)in);
      emu_launch(elementwise(in), BLOCK, [&] { avg_pool_bwd_f64(dy.data(), dx.data(), g); });
      write_vec(dx);
    } else {
      return 2;
    }
  } else if (k.rfind("bn_", 0) == 0) {
    int n, c, relu;
    long long hw;
    std::cin >> n >> c >> hw >> relu;
    const long long total = (long long)n * c * hw;
    if (k == "bn_stats") {
      Vec x = read_vec(), stats(2 * (size_t)c);
      emu_launch(per_value(c), BLOCK, [&] { bn_stats_f64(x.data(), stats.data(), n, c, hw); });
      write_vec(stats);
    } else if (k == "bn_fwd") {
      Vec x = read_vec(), gamma = read_vec(), beta = read_vec(), mean = read_vec(), invstd = read_vec();
      Vec y((size_t)total);
      emu_launch(elementwise(total), BLOCK, [&] {
        bn_fwd_f64(x.data(), gamma.data(), beta.data(), mean.data(), invstd.data(), y.data(), n, c, hw, relu);
      });
      write_vec(y);
    } else if (k == "bn_bwd") {
      Vec x = read_vec(), gamma = read_vec(), dy = read_vec(), mean = read_vec(), invstd = read_vec();
      Vec sums(2 * (size_t)c), packed((size_t)(total + 2 * c));
      emu_launch(per_value(c), BLOCK,
                 [&] { bn_bwd_sums_f64(x.data(), dy.data(), mean.data(), invstd.data(), sums.data(), n, c, hw); });
      emu_launch(elementwise(total + 2 * c), BLOCK, [&] {
        bn_bwd_dx_f64(x.data(), gamma.data(), dy.data(), mean.data(), invstd.data(), sums.data(), packed.data(), n,
                      c, hw);
      });
      write_vec(packed);
    } else {
      return 2;
    }
  } else if (k == "scaled_add") {
    long long per, total;
    int has_a, has_b;
    std::cin >> per >> total >> has_a >> has_b;
    Vec a = read_vec(), sa = read_vec(), b = read_vec(), sb = read_vec(), y((size_t)total);
    emu_launch(elementwise(total), BLOCK, [&] {
      scaled_add_f64(a.data(), has_a ? sa.data() : nullptr, b.data(), has_b ? sb.data() : nullptr, y.data(), per,
                     total);
    });
    write_vec(y);
  } else {
    std::cerr << "unknown kernel " << k << "\n";
    return 2;
  }
  return 0;
}
