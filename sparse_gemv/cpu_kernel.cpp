// The sparse GEMV on CPU in one pass: y[t, group g] = sum over k with |x[t, k]| > threshold[g] of
// x[t, k] * weight_t[k, group g], reading only the kept rows of weight_t ([K, N], row-major).
// Per token and group the kept inputs are compacted once; then each thread takes a contiguous range of columns and,
// for every kept row, streams that row's segment of its range into an accumulator that stays in L1, several kept
// rows per pass.
// sparse_gemv_rows takes fp32 weights and accumulates into the output row itself. quantized_sparse_gemv_rows takes
// group-wise quantized ones (sparse_gemv/grouped.py's layout: 4-bit codes two to a byte, or int8, with fp16 scales and
// optional zeros per group of input rows and column) or int8 with one fp32 scale per column (one group of all K rows):
// per group that has a kept row it sums x * code over the group's kept rows in fp32, then scales once (the zero point,
// or the -8 that makes a 4-bit code signed, applied once as well, times the group's sum of kept x). Groups without a
// kept row read neither codes nor scales.
// Built by sparse_gemv/cpu.py on first use (torch.utils.cpp_extension, -O3 -march=native); the loops are plain C++
// that the compiler vectorises. Threads come from torch's own pool (at::parallel_for).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__F16C__)
#include <immintrin.h>
#endif

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

// The kept inputs of every (token, group) of columns, compacted: kept[t * groups + g] points into rows and values.
struct Compacted {
  std::vector<int32_t> rows;
  std::vector<float> values;
  std::vector<Kept> kept;
};

// Inputs compared in float32 as the kernels and the reference compare them; thresholds [G] or [G, K].
Compacted compact_kept(const at::Tensor& x, const at::Tensor& thresholds, int64_t groups) {
  const int64_t tokens = x.size(0), k = x.size(1);
  const float* xs = x.const_data_ptr<float>();
  const float* th = thresholds.const_data_ptr<float>();
  const bool per_channel = thresholds.numel() != groups;
  Compacted c{std::vector<int32_t>(tokens * groups * k), std::vector<float>(tokens * groups * k),
              std::vector<Kept>(tokens * groups)};
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t base = (t * groups + g) * k;
      const float* xt = xs + t * k;
      int64_t count = 0;
      for (int64_t r = 0; r < k; ++r) {
        const float threshold = per_channel ? th[g * k + r] : th[g];
        c.rows[base + count] = static_cast<int32_t>(r);
        c.values[base + count] = xt[r];
        count += std::fabs(xt[r]) > threshold;
      }
      c.kept[t * groups + g] = Kept{c.rows.data() + base, c.values.data() + base, count};
    }
  }
  return c;
}

// Where each group of columns starts, and its end (N) last; checks x, thresholds and the split against N.
std::vector<int64_t> column_starts(const char* op, const at::Tensor& x, const at::Tensor& thresholds,
                                   c10::IntArrayRef split_sizes, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && thresholds.scalar_type() == at::kFloat &&
                  x.is_cpu() && thresholds.is_cpu() && x.is_contiguous() && thresholds.is_contiguous(),
              op, ": x must be a contiguous float32 [T, K] CPU tensor, thresholds float32 on the CPU");
  const int64_t groups = static_cast<int64_t>(split_sizes.size());
  TORCH_CHECK(thresholds.numel() == groups || thresholds.numel() == groups * x.size(1), op,
              ": thresholds must be [G] or [G, K]");
  std::vector<int64_t> starts(groups + 1, 0);
  for (int64_t g = 0; g < groups; ++g) {
    starts[g + 1] = starts[g] + split_sizes[g];
  }
  TORCH_CHECK(starts[groups] == n, op, ": split_sizes must sum to N");
  return starts;
}

at::Tensor sparse_gemv_rows(const at::Tensor& x, const at::Tensor& weight_t, const at::Tensor& thresholds,
                            c10::IntArrayRef split_sizes) {
  TORCH_CHECK(weight_t.dim() == 2 && x.dim() == 2 && x.size(1) == weight_t.size(0) &&
                  weight_t.scalar_type() == at::kFloat && weight_t.is_cpu() && weight_t.is_contiguous(),
              "teal_cpu::sparse_gemv_rows: weight_t must be a contiguous float32 [K, N] CPU tensor for x [T, K]");
  const int64_t tokens = x.size(0), n = weight_t.size(1);
  const int64_t groups = static_cast<int64_t>(split_sizes.size());
  const std::vector<int64_t> starts = column_starts("teal_cpu::sparse_gemv_rows", x, thresholds, split_sizes, n);
  const Compacted c = compact_kept(x, thresholds, groups);

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
        for (int64_t col = lo; col < hi; col += kMaxColumns) {
          accumulate(ys + t * n + col, ws + col, n, std::min(hi - col, kMaxColumns), c.kept[t * groups + g]);
        }
      }
    }
  });
  return y;
}

// Quantized weights. A pass covers up to kQuantColumns columns (a thread's whole range in most layers, so a kept row's
// codes are read in one segment); its sums, scales, zeros and output (four fp32 buffers, 64 KB) stay in L2 while the
// kept rows stream by, each pass's rows asked for (prefetched) during the pass before. With 4-bit codes every buffer holds the even columns
// (low nibbles) first, then the odd ones (high nibbles), so that no loop spreads a byte's two codes apart.
constexpr int64_t kQuantColumns = 4096;

template <typename Code>
constexpr int64_t kCodesPerByte = std::is_same_v<Code, uint8_t> ? 2 : 1;

// sums[0:planes * bytes] += sum over kept rows i..i+R of value * code(row)[0:bytes], the row's codes in its bytes
// w[row * ld : row * ld + bytes]
template <typename Code, int R>
inline void add_code_rows(float* __restrict sums, const Code* __restrict w, int64_t ld, int64_t bytes,
                          const Kept& kept, int64_t i) {
  const Code* row[R];
  float value[R];
  for (int r = 0; r < R; ++r) {
    row[r] = w + kept.rows[i + r] * ld;
    value[r] = kept.values[i + r];
  }
  for (int64_t j = 0; j < bytes; ++j) {
    if constexpr (kCodesPerByte<Code> == 2) {
      float low = value[0] * static_cast<float>(row[0][j] & 15);
      float high = value[0] * static_cast<float>(row[0][j] >> 4);
      for (int r = 1; r < R; ++r) {
        low += value[r] * static_cast<float>(row[r][j] & 15);
        high += value[r] * static_cast<float>(row[r][j] >> 4);
      }
      sums[j] += low;
      sums[bytes + j] += high;
    } else {
      float sum = value[0] * static_cast<float>(row[0][j]);
      for (int r = 1; r < R; ++r) {
        sum += value[r] * static_cast<float>(row[r][j]);
      }
      sums[j] += sum;
    }
  }
}

// the segments w[row * ld : row * ld + bytes] of kept rows [from, to) towards the cache, a read of each line
template <typename Code>
inline void prefetch_rows(const Code* w, int64_t ld, int64_t bytes, const Kept& kept, int64_t from, int64_t to) {
  for (int64_t i = from; i < to; ++i) {
    const char* row = reinterpret_cast<const char*>(w + kept.rows[i] * ld);
    for (int64_t j = 0; j < bytes; j += 64) {
      __builtin_prefetch(row + j);
    }
  }
}

// sums = sum over the kept rows of value * codes, for the kept rows [first, last) of the list
template <typename Code>
void sum_codes(float* __restrict sums, const Code* __restrict w, int64_t ld, int64_t bytes, const Kept& kept,
               int64_t first, int64_t last) {
  std::fill(sums, sums + kCodesPerByte<Code> * bytes, 0.0f);
  int64_t i = first;
  for (; i + 4 <= last; i += 4) {
    prefetch_rows(w, ld, bytes, kept, i + 4, std::min<int64_t>(i + 8, kept.count));
    add_code_rows<Code, 4>(sums, w, ld, bytes, kept, i);
  }
  for (; i < last; ++i) {
    prefetch_rows(w, ld, bytes, kept, i + 1, std::min<int64_t>(i + 2, kept.count));
    add_code_rows<Code, 1>(sums, w, ld, bytes, kept, i);
  }
}

// dst[0:n] = src[0:n] as float32, in the buffers' order (even columns first for 4-bit codes); staging: n floats
template <int CodesPerByte>
void load_floats(float* __restrict dst, const at::Half* __restrict src, int64_t n, float* __restrict staging) {
  float* linear = CodesPerByte == 2 ? staging : dst;
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(linear + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
#endif
  for (; i < n; ++i) {
    linear[i] = static_cast<float>(src[i]);
  }
  if constexpr (CodesPerByte == 2) {
    const int64_t half = n / 2;
    for (int64_t j = 0; j < half; ++j) {
      dst[j] = linear[2 * j];
      dst[half + j] = linear[2 * j + 1];
    }
  }
}

template <int CodesPerByte>
void load_floats(float* __restrict dst, const float* __restrict src, int64_t n, float*) {
  static_assert(CodesPerByte == 1, "fp32 scales go with int8 codes");
  std::copy(src, src + n, dst);
}

// Per (token, group of columns): where each quantization group's kept rows start in the compacted list (the last
// entry is the count) and the sum of their x.
struct GroupRanges {
  std::vector<int64_t> first;
  std::vector<float> x_sums;
};

GroupRanges group_ranges(const Compacted& c, int64_t group_size, int64_t quant_groups) {
  GroupRanges r{std::vector<int64_t>(c.kept.size() * (quant_groups + 1)),
                std::vector<float>(c.kept.size() * quant_groups, 0.0f)};
  for (size_t s = 0; s < c.kept.size(); ++s) {
    const Kept& kept = c.kept[s];
    int64_t* first = r.first.data() + s * (quant_groups + 1);
    float* x_sums = r.x_sums.data() + s * quant_groups;
    int64_t i = 0;
    for (int64_t q = 0; q < quant_groups; ++q) {
      first[q] = i;
      for (; i < kept.count && kept.rows[i] < (q + 1) * group_size; ++i) {
        x_sums[q] += kept.values[i];
      }
    }
    first[quant_groups] = kept.count;
  }
  return r;
}

// out[0:n] (the buffers' order) = the product of the kept inputs with columns [col, col + n) of the quantized weight
template <typename Code, typename Scale>
void quantized_columns(float* __restrict out, float* __restrict buffers, const Code* codes, int64_t ld,
                       const Scale* scales, const at::Half* zeros, int64_t n_total, int64_t col, int64_t n,
                       const Kept& kept, const int64_t* first, const float* x_sums, int64_t quant_groups) {
  constexpr int per_byte = kCodesPerByte<Code>;
  float* sums = buffers;
  float* scale = buffers + kQuantColumns;
  float* zero = buffers + 2 * kQuantColumns;
  float* staging = buffers + 3 * kQuantColumns;
  const int64_t bytes = n / per_byte;
  // without zero points a 4-bit code q stands for q - 8
  const float offset = per_byte == 2 && zeros == nullptr ? -8.0f : 0.0f;
  std::fill(out, out + n, 0.0f);
  for (int64_t q = 0; q < quant_groups; ++q) {
    if (first[q] == first[q + 1]) {
      continue;
    }
    // this group's scales and zeros towards the cache while its codes are summed
    for (int64_t j = 0; j < n; j += 64 / static_cast<int64_t>(sizeof(Scale))) {
      __builtin_prefetch(scales + q * n_total + col + j);
    }
    for (int64_t j = 0; zeros != nullptr && j < n; j += 32) {
      __builtin_prefetch(zeros + q * n_total + col + j);
    }
    sum_codes<Code>(sums, codes + col / per_byte, ld, bytes, kept, first[q], first[q + 1]);
    load_floats<per_byte>(scale, scales + q * n_total + col, n, staging);
    const float x_sum = x_sums[q];
    if (zeros != nullptr) {
      load_floats<per_byte>(zero, zeros + q * n_total + col, n, staging);
      for (int64_t j = 0; j < n; ++j) {
        out[j] += scale[j] * sums[j] + zero[j] * x_sum;
      }
    } else {
      const float shift = offset * x_sum;
      for (int64_t j = 0; j < n; ++j) {
        out[j] += scale[j] * (sums[j] + shift);
      }
    }
  }
}

template <typename Code, typename Scale>
void quantized_product(float* ys, const Code* codes, const Scale* scales, const at::Half* zeros, int64_t tokens,
                       int64_t n, int64_t quant_groups, const std::vector<int64_t>& starts,
                       const Compacted& c, const GroupRanges& ranges) {
  constexpr int per_byte = kCodesPerByte<Code>;
  const int64_t groups = static_cast<int64_t>(starts.size()) - 1, ld = n / per_byte;
  const int64_t lines = (n + kLine - 1) / kLine;
  at::parallel_for(0, lines, 1, [&](int64_t first, int64_t last) {
    std::vector<float> out(kQuantColumns), buffers(4 * kQuantColumns);
    const int64_t begin = first * kLine, end = std::min(last * kLine, n);
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t s = t * groups + g;
        const int64_t lo = std::max(begin, starts[g]), hi = std::min(end, starts[g + 1]);
        for (int64_t col = lo; col < hi; col += kQuantColumns) {
          const int64_t width = std::min(hi - col, kQuantColumns);
          quantized_columns<Code, Scale>(out.data(), buffers.data(), codes, ld, scales, zeros, n, col, width,
                                         c.kept[s], ranges.first.data() + s * (quant_groups + 1),
                                         ranges.x_sums.data() + s * quant_groups, quant_groups);
          float* y = ys + t * n + col;
          if constexpr (per_byte == 2) {
            const int64_t half = width / 2;
            for (int64_t j = 0; j < half; ++j) {
              y[2 * j] = out[j];
              y[2 * j + 1] = out[half + j];
            }
          } else {
            std::copy(out.begin(), out.begin() + width, y);
          }
        }
      }
    }
  });
}

// y[t, group g] = the masked x times the weight quantized weight_t stands for. group_size > 0: group-wise (uint8
// [K, N / 2] 4-bit codes or int8 [K, N], fp16 scales and optional zeros [ceil(K / group_size), N]); group_size 0: int8
// [K, N] with fp32 scales [N], one per column.
at::Tensor quantized_sparse_gemv_rows(const at::Tensor& x, const at::Tensor& weight_t, const at::Tensor& scales,
                                      const std::optional<at::Tensor>& zeros, int64_t group_size,
                                      const at::Tensor& thresholds, c10::IntArrayRef split_sizes) {
  const char* op = "teal_cpu::quantized_sparse_gemv_rows";
  TORCH_CHECK(x.dim() == 2 && weight_t.dim() == 2 && weight_t.size(0) == x.size(1) && weight_t.is_cpu() &&
                  weight_t.is_contiguous() && scales.is_cpu() && scales.is_contiguous(),
              op, ": weight_t must be contiguous [K, N / 2] or [K, N] for x [T, K], scales contiguous, on the CPU");
  const bool nibbles = weight_t.scalar_type() == at::kByte;
  TORCH_CHECK(nibbles || weight_t.scalar_type() == at::kChar, op, ": weight_t must be uint8 (4-bit) or int8");
  const int64_t tokens = x.size(0), k = x.size(1), n = weight_t.size(1) * (nibbles ? 2 : 1);
  int64_t quant_groups = 1;
  if (group_size > 0) {
    quant_groups = (k + group_size - 1) / group_size;
    TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.dim() == 2 && scales.size(0) == quant_groups &&
                    scales.size(1) == n,
                op, ": group-wise scales must be fp16 [ceil(K / group_size), N]");
    TORCH_CHECK(!zeros || (zeros->scalar_type() == at::kHalf && zeros->sizes() == scales.sizes() &&
                           zeros->is_cpu() && zeros->is_contiguous()),
                op, ": zeros must be contiguous fp16 like the scales");
  } else {
    TORCH_CHECK(!nibbles && !zeros && scales.scalar_type() == at::kFloat && scales.dim() == 1 && scales.size(0) == n,
                op, ": without groups the weights are int8 [K, N] with fp32 scales [N] and no zeros");
    group_size = std::max<int64_t>(k, 1);
  }
  const std::vector<int64_t> starts = column_starts(op, x, thresholds, split_sizes, n);
  for (size_t g = 1; nibbles && g < starts.size(); ++g) {
    TORCH_CHECK(starts[g] % 2 == 0, op, ": 4-bit weights need groups of columns of even sizes");
  }
  const Compacted c = compact_kept(x, thresholds, static_cast<int64_t>(split_sizes.size()));
  const GroupRanges ranges = group_ranges(c, group_size, quant_groups);

  at::Tensor y = at::empty({tokens, n}, x.options());
  float* ys = y.mutable_data_ptr<float>();
  const at::Half* zs = zeros ? zeros->const_data_ptr<at::Half>() : nullptr;
  if (nibbles) {
    quantized_product(ys, weight_t.const_data_ptr<uint8_t>(), scales.const_data_ptr<at::Half>(), zs, tokens, n,
                      quant_groups, starts, c, ranges);
  } else if (scales.scalar_type() == at::kHalf) {
    quantized_product(ys, weight_t.const_data_ptr<int8_t>(), scales.const_data_ptr<at::Half>(), zs, tokens, n,
                      quant_groups, starts, c, ranges);
  } else {
    quantized_product(ys, weight_t.const_data_ptr<int8_t>(), scales.const_data_ptr<float>(), zs, tokens, n,
                      quant_groups, starts, c, ranges);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(teal_cpu, m) {
  m.def("sparse_gemv_rows(Tensor x, Tensor weight_t, Tensor thresholds, int[] split_sizes) -> Tensor",
        &sparse_gemv_rows);
  m.def("quantized_sparse_gemv_rows(Tensor x, Tensor weight_t, Tensor scales, Tensor? zeros, int group_size, "
        "Tensor thresholds, int[] split_sizes) -> Tensor",
        &quantized_sparse_gemv_rows);
}
