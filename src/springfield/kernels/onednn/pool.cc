// The passes of a conv + bias + ReLU + pool block (block.cc) over the convolution's output:
// 2x2 average pooling with ReLU's mask, and its gradient; portable and AVX-512 versions.
#include "common.h"

namespace springfield {

namespace {

// Whether the AVX-512 versions of the passes below run (SPRINGFIELD_KERNELS_AVX512=0 keeps
// the portable ones, which the tests check against the same references).
bool Avx512() {
  const char* env = std::getenv("SPRINGFIELD_KERNELS_AVX512");
  return __builtin_cpu_supports("avx512f") && !(env != nullptr && std::string(env) == "0");
}

// The same rounding, 16 at a time: the scalar loop does not vectorise (no 32->16-bit
// narrowing below AVX-512), and at ~1 ns an element it took 2x the memory pass it sits in.
__attribute__((target("avx512f"))) void ToBf16Avx512(const float* in, uint16_t* out,
                                                     int64_t n) {
  const __m512i round = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512i u = _mm512_castps_si512(_mm512_loadu_ps(in + i));
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
    u = _mm512_add_epi32(u, _mm512_add_epi32(round, odd));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
  }
  for (; i < n; ++i) out[i] = ToBf16(in[i]);
}

void ToBf16Row(const float* in, uint16_t* out, int64_t n) {
  static const bool avx512 = Avx512();
  if (avx512) {
    ToBf16Avx512(in, out, n);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = ToBf16(in[i]);
  }
}

void FromBf16Row(const uint16_t* in, float* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(in[i]) << 16;
    std::memcpy(out + i, &u, 4);
  }
}

// A per-thread float row for the passes that read or write bfloat16: they compute in
// float32 there and convert the row at once.
float* RowScratch(int64_t count, int which) {
  static thread_local std::vector<float> rows[3];
  if (static_cast<int64_t>(rows[which].size()) < count) rows[which].resize(count);
  return rows[which].data();
}

// ReLU's mask keeps one bit per element of the convolution's output (bit e % 8 of byte
// e / 8 of the flat index e; `c` a multiple of 8): a byte each was the largest array the
// block wrote and read back (67 MB at 128 px for the first block), and memory, not
// arithmetic, bounds these passes. Each pass below has a portable version for `n` (or `c`)
// a multiple of 8 and an AVX-512 one that does 16 at a time and leaves the rest to it.
void MaskBytes(const float* row, uint8_t* m, int64_t n) {
  for (int64_t e = 0; e < n; e += 8) {
    uint8_t bits = 0;
    for (int k = 0; k < 8; ++k) bits |= static_cast<uint8_t>(row[e + k] > 0.f) << k;
    m[e / 8] = bits;
  }
}

__attribute__((target("avx512f"))) void MaskBytesAvx512(const float* row, uint8_t* m,
                                                        int64_t n) {
  int64_t e = 0;
  for (; e + 16 <= n; e += 16) {
    const uint16_t bits = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + e), _mm512_setzero_ps(),
                                             _CMP_GT_OQ);
    std::memcpy(m + e / 8, &bits, 2);
  }
  MaskBytes(row + e, m + e / 8, n - e);
}

void MaskRow(const float* row, uint8_t* m, int64_t n) {
  static const bool avx512 = Avx512();
  (avx512 ? MaskBytesAvx512 : MaskBytes)(row, m, n);
}

// Each mask byte as 8 lanes of all-ones or zero bits: an AND per element, which compilers
// vectorise (a select by bit, not a branch: the mask is as random as the activations).
const uint32_t* ByteLanes() {
  static const std::vector<uint32_t> lanes = [] {
    std::vector<uint32_t> t(256 * 8);
    for (int b = 0; b < 256; ++b) {
      for (int k = 0; k < 8; ++k) t[b * 8 + k] = (b >> k) & 1 ? 0xFFFFFFFFu : 0u;
    }
    return t;
  }();
  return lanes.data();
}

// One output column's `c` channels: o[ch] = g[ch] / 4 where bit ch of `m` is set, else 0.
void UnpoolLanes(const float* g, const uint8_t* m, float* o, int64_t c) {
  const uint32_t* table = ByteLanes();
  for (int64_t ch = 0; ch < c; ch += 8) {
    const uint32_t* lanes = table + 8 * m[ch / 8];
    for (int k = 0; k < 8; ++k) {
      float v = 0.25f * g[ch + k];
      uint32_t u;
      std::memcpy(&u, &v, 4);
      u &= lanes[k];
      std::memcpy(o + ch + k, &u, 4);
    }
  }
}

__attribute__((target("avx512f"))) void UnpoolLanesAvx512(const float* g, const uint8_t* m,
                                                          float* o, int64_t c) {
  const __m512 quarter = _mm512_set1_ps(0.25f);
  int64_t ch = 0;
  for (; ch + 16 <= c; ch += 16) {
    uint16_t bits;
    std::memcpy(&bits, m + ch / 8, 2);
    _mm512_storeu_ps(o + ch, _mm512_maskz_mul_ps(bits, _mm512_loadu_ps(g + ch), quarter));
  }
  UnpoolLanes(g + ch, m + ch / 8, o + ch, c - ch);
}

// One row of the convolution output's gradient: out[j, ch] = g[j / 2, ch] / 4 where the
// mask bit of element j * c + ch is set, else 0 (and 0 for a last odd column).
void UnpoolRow(const float* g, const uint8_t* m, float* out, int64_t ow, int64_t pw,
               int64_t c) {
  static const bool avx512 = Avx512();
  const auto lanes = avx512 ? UnpoolLanesAvx512 : UnpoolLanes;
  for (int64_t j = 0; j < ow; ++j) {
    if (j / 2 >= pw) {
      std::fill(out + j * c, out + (j + 1) * c, 0.f);
    } else {
      lanes(g + (j / 2) * c, m + j * c / 8, out + j * c, c);
    }
  }
}

}  // namespace

// y[n, i, j, c] = mean of r over the 2x2 window at (2i, 2j); r and y each float32 or (the
// flags) bfloat16; the mask's bits say r > 0 everywhere (rows and columns the floor division
// leaves out get no gradient anyway).
void PoolAndMask(const void* r, bool r_bf16, void* y, bool y_bf16, uint8_t* mask, int64_t n,
                 int64_t oh, int64_t ow, int64_t c) {
  const int64_t ph = oh / 2, pw = ow / 2, pairs = (oh + 1) / 2;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < n; ++b) {
    for (int64_t p = 0; p < pairs; ++p) {
      const float* rows[2];
      for (int64_t t = 0; t < 2 && 2 * p + t < oh; ++t) {
        const int64_t at = (b * oh + 2 * p + t) * ow * c;
        if (r_bf16) {
          float* f = RowScratch(ow * c, 1 + t);
          FromBf16Row(static_cast<const uint16_t*>(r) + at, f, ow * c);
          rows[t] = f;
        } else {
          rows[t] = static_cast<const float*>(r) + at;
        }
        if (mask != nullptr) MaskRow(rows[t], mask + at / 8, ow * c);
      }
      if (p >= ph) continue;  // a last odd row: its mask only
      const int64_t at = (b * ph + p) * pw * c;
      float* out = y_bf16 ? RowScratch(pw * c, 0) : static_cast<float*>(y) + at;
      for (int64_t j = 0; j < pw; ++j) {
        const float* a = rows[0] + 2 * j * c;
        const float* d = rows[1] + 2 * j * c;
#pragma omp simd
        for (int64_t ch = 0; ch < c; ++ch)
          out[j * c + ch] = 0.25f * (a[ch] + a[c + ch] + d[ch] + d[c + ch]);
      }
      if (y_bf16) ToBf16Row(out, static_cast<uint16_t*>(y) + at, pw * c);
    }
  }
}

// dz[n, i, j, c] = dy[n, i/2, j/2, c] / 4 where the mask's bit is set, else 0; dy and dz
// each float32 or (the flags) bfloat16.
void Unpool(const void* dy, bool dy_bf16, const uint8_t* mask, void* dz, bool dz_bf16,
            int64_t n, int64_t oh, int64_t ow, int64_t c) {
  const int64_t ph = oh / 2, pw = ow / 2;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < n; ++b) {
    for (int64_t i = 0; i < oh; ++i) {
      const int64_t at = (b * oh + i) * ow * c;
      float* out = dz_bf16 ? RowScratch(ow * c, 0) : static_cast<float*>(dz) + at;
      if (i / 2 >= ph) {
        std::fill(out, out + ow * c, 0.f);
      } else {
        const int64_t g_at = (b * ph + i / 2) * pw * c;
        const float* g = static_cast<const float*>(dy) + g_at;
        if (dy_bf16) {
          float* gf = RowScratch(pw * c, 1);
          FromBf16Row(static_cast<const uint16_t*>(dy) + g_at, gf, pw * c);
          g = gf;
        }
        UnpoolRow(g, mask + at / 8, out, ow, pw, c);
      }
      if (dz_bf16) ToBf16Row(out, static_cast<uint16_t*>(dz) + at, ow * c);
    }
  }
}

}  // namespace springfield
