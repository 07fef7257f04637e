// The sparse GEMV on CPU in one pass: y[t, group g] = sum over k with |x[t, k]| > threshold[g] of
// x[t, k] * weight_t[k, group g], reading only the kept rows of weight_t ([K, N] fp32, row-major).
// Per token and group the kept inputs are compacted once; then each thread takes a contiguous range of columns and,
// for every kept row, streams that row's segment of its range into an accumulator that stays in L1 (the output row
// itself), several kept rows per pass.
// Built by sparse_gemv/cpu.py on first use (torch.utils.cpp_extension, -O3 -march=native); the loops are plain C++
// that the compiler vectorises. Threads come from torch's own pool (at::parallel_for).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kLine = 16;          // floats in a 64-byte cache line
constexpr int kRowsPerPass = 8;        // kept rows added per load and store of the accumulator
constexpr int64_t kMaxColumns = 4096;  // accumulator columns at a time (16 KB: L1-resident beside the rows' lines)

// The kept inputs of one (token, group): their rows and values, ascending.
struct Kept {
  const int32_t* rows;
  const float* values;
  int64_t count;
};

// acc[0:n] += sum over kept rows i..i+R of value * w[row * ld : row * ld + n]; w points at the segment's first column.
template <int R>
inline void add_rows(float* __restrict acc, const float* __restrict w, int64_t ld, int64_t n, const Kept& kept,
                     int64_t i) {
  const float* row[R];
  float value[R];
  for (int r = 0; r < R; ++r) {
    row[r] = w + kept.rows[i + r] * ld;
    value[r] = kept.values[i + r];
  }
  for (int64_t j = 0; j < n; ++j) {
    float sum = value[0] * row[0][j];
    for (int r = 1; r < R; ++r) {
      sum += value[r] * row[r][j];
    }
    acc[j] += sum;
  }
}

// acc[0:n] = sum over the kept rows of value * w[row * ld : row * ld + n]
void accumulate(float* __restrict acc, const float* __restrict w, int64_t ld, int64_t n, const Kept& kept) {
  std::fill(acc, acc + n, 0.0f);
  int64_t i = 0;
  for (; i + kRowsPerPass <= kept.count; i += kRowsPerPass) {
    add_rows<kRowsPerPass>(acc, w, ld, n, kept, i);
  }
  for (; i < kept.count; ++i) {
    add_rows<1>(acc, w, ld, n, kept, i);
  }
}

at::Tensor sparse_gemv_rows(const at::Tensor& x, const at::Tensor& weight_t, const at::Tensor& thresholds,
                            c10::IntArrayRef split_sizes) {
  TORCH_CHECK(x.dim() == 2 && weight_t.dim() == 2 && x.size(1) == weight_t.size(0),
              "teal_cpu::sparse_gemv_rows: x must be [T, K] and weight_t [K, N]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight_t.scalar_type() == at::kFloat &&
                  thresholds.scalar_type() == at::kFloat,
              "teal_cpu::sparse_gemv_rows: x, weight_t and thresholds must be float32");
  TORCH_CHECK(x.is_cpu() && weight_t.is_cpu() && thresholds.is_cpu() && x.is_contiguous() &&
                  weight_t.is_contiguous() && thresholds.is_contiguous(),
              "teal_cpu::sparse_gemv_rows: contiguous CPU tensors only");
  const int64_t tokens = x.size(0), k = x.size(1), n = weight_t.size(1);
  const int64_t groups = static_cast<int64_t>(split_sizes.size());
  TORCH_CHECK(thresholds.numel() == groups || thresholds.numel() == groups * k,
              "teal_cpu::sparse_gemv_rows: thresholds must be [G] or [G, K]");
  std::vector<int64_t> starts(groups + 1, 0);
  for (int64_t g = 0; g < groups; ++g) {
    starts[g + 1] = starts[g] + split_sizes[g];
  }
  TORCH_CHECK(starts[groups] == n, "teal_cpu::sparse_gemv_rows: split_sizes must sum to N");

  // compact the kept inputs of every (token, group), compared in float32 as the kernels and the reference compare
  const float* xs = x.const_data_ptr<float>();
  const float* th = thresholds.const_data_ptr<float>();
  const bool per_channel = thresholds.numel() != groups;
  std::vector<int32_t> rows(tokens * groups * k);
  std::vector<float> values(tokens * groups * k);
  std::vector<Kept> kept(tokens * groups);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t base = (t * groups + g) * k;
      const float* xt = xs + t * k;
      int64_t count = 0;
      for (int64_t r = 0; r < k; ++r) {
        const float threshold = per_channel ? th[g * k + r] : th[g];
        rows[base + count] = static_cast<int32_t>(r);
        values[base + count] = xt[r];
        count += std::fabs(xt[r]) > threshold;
      }
      kept[t * groups + g] = Kept{rows.data() + base, values.data() + base, count};
    }
  }

  at::Tensor y = at::empty({tokens, n}, x.options());
  float* ys = y.mutable_data_ptr<float>();
  const float* ws = weight_t.const_data_ptr<float>();
  // each thread a contiguous range of whole cache lines of columns, within it each group's part in turn
  const int64_t lines = (n + kLine - 1) / kLine;
  at::parallel_for(0, lines, 1, [&](int64_t first, int64_t last) {
    const int64_t begin = first * kLine, end = std::min(last * kLine, n);
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t lo = std::max(begin, starts[g]), hi = std::min(end, starts[g + 1]);
        for (int64_t c = lo; c < hi; c += kMaxColumns) {
          accumulate(ys + t * n + c, ws + c, n, std::min(hi - c, kMaxColumns), kept[t * groups + g]);
        }
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(teal_cpu, m) {
  m.def("sparse_gemv_rows(Tensor x, Tensor weight_t, Tensor thresholds, int[] split_sizes) -> Tensor",
        &sparse_gemv_rows);
}
