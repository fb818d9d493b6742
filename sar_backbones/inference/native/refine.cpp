// Fused sparse refine op of SAR-ResNet on CPU float32 (issue 18, point 3).
//
// The same contract as sar_backbones.inference.sparse.refine_stage: a chain of
// BN-folded refine blocks run on their selected patches only. One C++ call per
// stage, no Python inside. Design (XNNPACK's "indirect convolution"):
//
// * activations are channels-last pixel rows; a convolution is a GEMM whose A
//   operand is read through row pointers, one per (output pixel, tap), so the
//   gather of the selected pixels (and the im2col of a 3x3 window) costs no copy:
//   a pointer to a masked-out or outside pixel points at a zero row;
// * the microkernel computes a 6 x 16 output tile (12 accumulators) and runs
//   its epilogue in registers: bias + ReLU for inner convolutions; for the last
//   convolution the residual add (identity) or the projection shortcut (a
//   second K segment accumulated into the same registers), b_last, the ReLU and
//   the scatter to the pixel rows of the block output;
// * weights are read in place in the HWIO layout that switch_to_deploy() gives
//   them (16-column panels are column ranges of it): no packing, no cache at
//   run time; weights in another layout (undeployed models) are laid out per call;
// * a block is two phases, each one parallel region over work items of both
//   mask groups G: phase A runs the first convolution on every selected pixel
//   into a compact buffer (the 3x3 that follows reads the first convolution's
//   output of neighbouring selected patches in its halo); phase B runs the
//   rest of the block patch by patch and writes the block output, the
//   unselected patches included (shortcut + b_last, ReLU).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

namespace {

constexpr int MR = 6;   // output pixels per tile
constexpr int NR = 16;  // output channels per tile (two 8-float vectors)
constexpr int CHUNK = 96;  // pixel rows per work item: parallel slack on large patches

typedef float v8 __attribute__((vector_size(32), aligned(4), may_alias));

inline v8 load8(const float* p) { return *reinterpret_cast<const v8*>(p); }
inline void store8(float* p, v8 v) { *reinterpret_cast<v8*>(p) = v; }

// ---------------------------------------------------------------- weights
// A convolution weight (C_out, C_in/groups, k, k) read in place as the GEMM B
// operand: row (tap t, input channel k) of output column c at
// data[(t * cin + k) * ldb + c] -- the HWIO layout (k, k, C_in/groups, C_out),
// rows padded to ldb = C_out + 16 floats so that they do not all fall on the
// same cache sets (C_out is a power of two), that switch_to_deploy() gives the
// refine weights (deploy.py's kernel_layout), so a
// deployed forward packs nothing and caches nothing; the weights themselves are
// the prepacked state and an in-place change shows at once. A weight in any
// other layout (a model that was not deployed) is laid out per call.
struct Weights {
  at::Tensor holder;          // the HWIO tensor read (the weight itself when deployed)
  const float* data = nullptr;
  int64_t ldb = 0;            // C_out of all groups: the stride between B rows
  int out_groups = 0;         // groups of output channels
  int cin = 0;                // input channels per output group (K per tap)
  int cout = 0;               // output channels per output group
  int taps = 0;               // kernel height * width (1 or 9)
  int kernel = 0;             // kernel side
  int panels = 0;             // ceil(cout / NR)

  // First B row of panel p (NR columns) of output group g.
  const float* panel(int group, int p) const {
    return data + static_cast<int64_t>(group) * cout + static_cast<int64_t>(p) * NR;
  }
};

// The B row stride of `weight` when it is float32 in the (padded) HWIO layout
// of deploy.py's kernel_layout: strides (1, ldb, kw * cin * ldb, cin * ldb)
// with ldb >= C_out (the padding keeps rows off the same cache sets); 0 otherwise.
int64_t hwio_ldb(const at::Tensor& weight) {
  if (weight.scalar_type() != at::kFloat || weight.size(1) < 2) return 0;
  const int64_t ldb = weight.stride(1);
  const bool ok = weight.stride(0) == 1 && ldb >= weight.size(0) &&
                  (weight.size(3) == 1 || weight.stride(3) == weight.size(1) * ldb) &&
                  (weight.size(2) == 1 || weight.stride(2) == weight.size(3) * weight.size(1) * ldb);
  return ok ? ldb : 0;
}

Weights weights_of(const at::Tensor& weight, int out_groups) {
  Weights p;
  p.ldb = hwio_ldb(weight);
  if (p.ldb) {
    p.holder = weight;  // deployed: read in place
  } else {  // not deployed (or re-laid out since): lay out per call
    p.holder = weight.permute({2, 3, 1, 0}).to(at::kFloat).contiguous();
    p.ldb = weight.size(0);
  }
  p.data = p.holder.data_ptr<float>();
  p.out_groups = out_groups;
  p.cin = static_cast<int>(weight.size(1));
  p.cout = static_cast<int>(weight.size(0)) / out_groups;
  p.kernel = static_cast<int>(weight.size(2));
  p.taps = static_cast<int>(weight.size(2) * weight.size(3));
  p.panels = (p.cout + NR - 1) / NR;
  return p;
}

// One panel (rows x nc columns, row stride ldb) copied into `out` as rows of
// NR contiguous floats, zero-padded when nc < NR (small test widths), so the
// microkernel never reads past the weight.
void pack_panel(const float* w, int64_t ldb, int rows, int nc, std::vector<float>& out) {
  out.resize(static_cast<size_t>(rows) * NR);
  for (int r = 0; r < rows; ++r) {
    float* dst = &out[static_cast<size_t>(r) * NR];
    std::memcpy(dst, w + r * ldb, sizeof(float) * nc);
    if (nc < NR) std::memset(dst + nc, 0, sizeof(float) * (NR - nc));
  }
}

// ---------------------------------------------------------------- microkernel
// One K segment of a tile: `taps` x MR row pointers (channel offset applied)
// and the panel of packed weights they multiply.
struct Segment {
  const float* const* rows;
  int taps;
  int kc;
  const float* w;  // B row 0 of the panel
  int64_t ldb;     // stride between B rows
};

// out[r][0:nc] = epilogue(bias + sum over segments of rows . w), r < mr.
// resid (may be null): rows added before the ReLU (the identity shortcut).
inline void tile(int mr, int nc, const Segment* segs, int nsegs, const float* bias,
                 float* const* out, const float* const* resid, bool relu) {
  v8 c00 = load8(bias), c01 = load8(bias + 8);
  v8 c10 = c00, c11 = c01, c20 = c00, c21 = c01, c30 = c00, c31 = c01, c40 = c00, c41 = c01,
     c50 = c00, c51 = c01;
  for (int s = 0; s < nsegs; ++s) {
    const float* w = segs[s].w;
    const int64_t ldb = segs[s].ldb;
    const int kc = segs[s].kc;
    for (int t = 0; t < segs[s].taps; ++t) {
      const float* const* a = segs[s].rows + t * MR;
      const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5];
      for (int k = 0; k < kc; ++k) {
        const v8 b0 = load8(w), b1 = load8(w + 8);
        // Strided weight rows (ldb floats apart) defeat the hardware
        // prefetcher: fetch a few rows ahead.
        __builtin_prefetch(w + 8 * ldb);
        w += ldb;
        float v;
        v = a0[k]; c00 += v * b0; c01 += v * b1;
        v = a1[k]; c10 += v * b0; c11 += v * b1;
        v = a2[k]; c20 += v * b0; c21 += v * b1;
        v = a3[k]; c30 += v * b0; c31 += v * b1;
        v = a4[k]; c40 += v * b0; c41 += v * b1;
        v = a5[k]; c50 += v * b0; c51 += v * b1;
      }
    }
  }
  v8 acc[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  const v8 zero = {};
  for (int r = 0; r < mr; ++r) {
    v8 lo = acc[r][0], hi = acc[r][1];
    if (nc == NR) {
      if (resid) {
        lo += load8(resid[r]);
        hi += load8(resid[r] + 8);
      }
      if (relu) {
        lo = lo > zero ? lo : zero;
        hi = hi > zero ? hi : zero;
      }
      store8(out[r], lo);
      store8(out[r] + 8, hi);
    } else {  // a narrow last panel (small test widths)
      float tmp[NR];
      store8(tmp, lo);
      store8(tmp + 8, hi);
      for (int c = 0; c < nc; ++c) {
        float v = tmp[c] + (resid ? resid[r][c] : 0.f);
        out[r][c] = relu && v < 0.f ? 0.f : v;
      }
    }
  }
}

// ---------------------------------------------------------------- geometry
struct Geometry {
  int batch, height, width, kh, kw, ph, pw, pp, dilation;
  std::vector<int> row_start, col_start, cell_row, cell_col;

  Geometry(int b, int h, int w, int gh, int gw, int d)
      : batch(b), height(h), width(w), kh(gh), kw(gw), dilation(d) {
    auto starts = [](int size, int cells, std::vector<int>& s, std::vector<int>& cell, int& ext) {
      s.resize(cells + 1);
      ext = 0;
      for (int i = 0; i <= cells; ++i)  // first pixel y with y * cells / size == i
        s[i] = static_cast<int>((static_cast<int64_t>(i) * size + cells - 1) / cells);
      for (int i = 0; i < cells; ++i) ext = std::max(ext, s[i + 1] - s[i]);
      cell.resize(size);
      for (int y = 0; y < size; ++y)
        cell[y] = static_cast<int>(static_cast<int64_t>(y) * cells / size);
    };
    starts(h, gh, row_start, cell_row, ph);
    starts(w, gw, col_start, cell_col, pw);
    pp = ph * pw;
  }
  int cells() const { return kh * kw; }
  int cell_of(int y, int x) const { return cell_row[y] * kw + cell_col[x]; }
  int local_of(int y, int x) const {
    return (y - row_start[cell_row[y]]) * pw + (x - col_start[cell_col[x]]);
  }
  int cell_pixels(int cell) const {
    const int cy = cell / kw, cx = cell % kw;
    return (row_start[cy + 1] - row_start[cy]) * (col_start[cx + 1] - col_start[cx]);
  }
  // (y, x) of the index-th pixel of a cell, row-major.
  void pixel(int cell, int index, int& y, int& x) const {
    const int cy = cell / kw, cx = cell % kw;
    const int cw = col_start[cx + 1] - col_start[cx];
    y = row_start[cy] + index / cw;
    x = col_start[cx] + index % cw;
  }
};

const float* zero_row(size_t channels) {
  static std::mutex m;
  static std::vector<float>* zeros = new std::vector<float>(4096, 0.f);
  std::lock_guard<std::mutex> lock(m);
  if (zeros->size() < channels + NR) {
    // Never freed: a concurrent call may still read the old buffer.
    zeros = new std::vector<float>(channels + NR, 0.f);
  }
  return zeros->data();
}

struct Item {  // pixel rows [begin, end) of one cell of one image for mask group g
  int image, cell, group, begin, end;
  int rank;  // slot of the cell in group g's compact buffer, -1 when not selected
};

// Per-thread buffers of a parallel region.
struct Scratch {
  std::vector<const float*> src;   // [tile][tap][MR] A row pointers
  std::vector<const float*> xrows; // [tile][MR] block input rows (projection shortcut)
  std::vector<float*> outs;        // [tile][MR] output rows
  std::vector<float*> inner;       // [tile][MR] rows of the inner activations
  std::unique_ptr<float[]> buffer; // inner activations, two halves (ping-pong)
};

template <typename Fn>
void run_items(int64_t count, size_t buffer_floats, const Fn& fn) {
  if (count == 0) return;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), count);
  std::atomic<int64_t> next{0};
  // One task per thread; each claims work items dynamically (uneven patches).
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    Scratch scratch;
    if (buffer_floats) scratch.buffer.reset(new float[buffer_floats]);
    for (int64_t i; (i = next.fetch_add(1)) < count;) fn(i, scratch);
  });
}

// A convolution (output group `og` of `w`) on m rows: A rows through `src`
// ([tile][tap][MR]); optionally a second K segment (the projection shortcut,
// output group og2 of w2, rows `src2` [tile][MR]) into the same accumulators.
// Writes outs[row] + col0 (+ panel); `residual`: adds the old value (in place).
// Panels outer, tiles inner: a panel of weights stays in cache for the chunk.
void conv_rows(int m, const Weights& w, int og, const float* const* src, const Weights* w2,
               int og2, const float* const* src2, const float* bias, float* const* outs,
               size_t col0, bool residual, bool relu) {
  const int tiles = (m + MR - 1) / MR;
  float* dst[MR];
  const float* res[MR];
  std::vector<float> copy, copy2;  // padded copies of a narrow last panel
  for (int pn = 0; pn < w.panels; ++pn) {
    const int nc = std::min(NR, w.cout - pn * NR);
    Segment segs[2] = {{nullptr, w.taps, w.cin, w.panel(og, pn), w.ldb},
                       {nullptr, 1, w2 ? w2->cin : 0, w2 ? w2->panel(og2, pn) : nullptr,
                        w2 ? w2->ldb : 0}};
    if (nc < NR) {
      pack_panel(segs[0].w, w.ldb, w.taps * w.cin, nc, copy);
      segs[0].w = copy.data();
      segs[0].ldb = NR;
      if (w2) {
        pack_panel(segs[1].w, w2->ldb, w2->cin, nc, copy2);
        segs[1].w = copy2.data();
        segs[1].ldb = NR;
      }
    }
    for (int tl = 0; tl < tiles; ++tl) {
      const int mr = std::min(MR, m - tl * MR);
      segs[0].rows = src + static_cast<size_t>(tl) * w.taps * MR;
      segs[1].rows = w2 ? src2 + static_cast<size_t>(tl) * MR : nullptr;
      for (int r = 0; r < mr; ++r) {
        dst[r] = outs[tl * MR + r] + col0 + pn * NR;
        res[r] = dst[r];
      }
      tile(mr, nc, segs, w2 ? 2 : 1, bias + pn * NR, dst, residual ? res : nullptr, relu);
    }
  }
}

// Bias padded to whole panels: [group][panel][NR]; `extra` (may be undefined) added.
std::vector<float> padded_bias(const at::Tensor& bias, const at::Tensor& extra,
                               const Weights& p) {
  std::vector<float> out(static_cast<size_t>(p.out_groups) * p.panels * NR, 0.f);
  at::Tensor b = bias.to(at::kFloat).contiguous();
  at::Tensor e = extra.defined() ? extra.to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = b.data_ptr<float>();
  const float* ep = e.defined() ? e.data_ptr<float>() : nullptr;
  for (int g = 0; g < p.out_groups; ++g)
    for (int c = 0; c < p.cout; ++c)
      out[(static_cast<size_t>(g) * p.panels) * NR + c] =
          bp[g * p.cout + c] + (ep ? ep[g * p.cout + c] : 0.f);
  return out;
}

struct Conv {
  std::shared_ptr<const Weights> w;
  std::vector<float> bias;  // padded per panel
  int groups_per_mask = 1;  // conv groups inside one mask group
};

}  // namespace

at::Tensor refine_stage_native(const at::Tensor& x_in, const at::Tensor& masks_in,
                               at::TensorList weights, at::TensorList biases,
                               int64_t convs_per_block, at::IntArrayRef shortcuts,
                               at::IntArrayRef last_relus, int64_t dilation) {
  TORCH_CHECK(x_in.dim() == 4 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "sar_native::refine_stage: x must be a float32 CPU (B, C, H, W) tensor");
  TORCH_CHECK(masks_in.dim() == 5, "sar_native::refine_stage: masks must be (N, B, G, Kh, Kw)");
  TORCH_CHECK(convs_per_block >= 2, "sar_native::refine_stage: blocks of >= 2 convolutions");
  const int blocks = static_cast<int>(masks_in.size(0));
  TORCH_CHECK(static_cast<int64_t>(shortcuts.size()) == blocks &&
                  static_cast<int64_t>(last_relus.size()) == blocks,
              "sar_native::refine_stage: masks, shortcuts and last_relus must agree");
  const int batch = static_cast<int>(x_in.size(0)), height = static_cast<int>(x_in.size(2)),
            width = static_cast<int>(x_in.size(3));
  const int G = static_cast<int>(masks_in.size(2));
  const Geometry geo(batch, height, width, static_cast<int>(masks_in.size(3)),
                     static_cast<int>(masks_in.size(4)), static_cast<int>(dilation));
  const int64_t hw = static_cast<int64_t>(height) * width, rows_total = batch * hw;
  at::Tensor selected = (masks_in != 0).to(at::kByte).contiguous();  // (N, B, G, Kh*Kw)
  const uint8_t* sel_all = selected.data_ptr<uint8_t>();

  // The stage input as channels-last pixel rows (a view when it already is).
  at::Tensor cur = x_in.permute({0, 2, 3, 1});
  bool owned = false;
  if (!cur.is_contiguous()) {
    cur = cur.contiguous();
    owned = true;
  }
  size_t w_index = 0;
  for (int b = 0; b < blocks; ++b) {
    const bool projection = shortcuts[b] != 0;
    const bool last_relu = last_relus[b] != 0;
    const int cx = static_cast<int>(cur.size(3));
    TORCH_CHECK(w_index + convs_per_block + projection <= weights.size(),
                "sar_native::refine_stage: too few weights for the blocks");
    // Check the block's convolutions (read in place when deployed: HWIO).
    std::vector<Conv> convs(convs_per_block);
    int in_ch = cx;
    for (int i = 0; i < convs_per_block; ++i) {
      const at::Tensor& w = weights[w_index + i];
      TORCH_CHECK(w.dim() == 4 && w.size(2) == w.size(3) && (w.size(2) == 1 || w.size(2) == 3),
                  "sar_native::refine_stage: 1x1 and 3x3 convolutions only");
      TORCH_CHECK(i < 2 || w.size(2) == 1,
                  "sar_native::refine_stage: a 3x3 convolution after the second one");
      TORCH_CHECK(in_ch % w.size(1) == 0, "sar_native::refine_stage: weight ",
                  w.sizes(), " does not fit ", in_ch, " input channels");
      const int conv_groups = static_cast<int>(in_ch / w.size(1));
      TORCH_CHECK(conv_groups % G == 0 && w.size(0) % conv_groups == 0,
                  "sar_native::refine_stage: conv groups must be a multiple of G");
      TORCH_CHECK(i + 1 < convs_per_block || conv_groups == G,
                  "sar_native::refine_stage: the last convolution must have G groups");
      convs[i].w = std::make_shared<const Weights>(weights_of(w, conv_groups));
      convs[i].groups_per_mask = conv_groups / G;
      in_ch = static_cast<int>(w.size(0));
    }
    const int cout = in_ch;
    const Weights& last = *convs.back().w;
    at::Tensor last_bias = biases[w_index + convs_per_block - 1];
    std::shared_ptr<const Weights> sc;
    std::vector<float> final_bias;
    if (projection) {
      const at::Tensor& w = weights[w_index + convs_per_block];
      TORCH_CHECK(w.dim() == 4 && w.size(2) == 1 && w.size(3) == 1 && w.size(1) == cx &&
                      w.size(0) == cout,
                  "sar_native::refine_stage: the shortcut must be a full 1x1 convolution");
      sc = std::make_shared<const Weights>(weights_of(w, G));
      final_bias = padded_bias(biases[w_index + convs_per_block], last_bias, *sc);
    } else {
      TORCH_CHECK(cout == cx, "sar_native::refine_stage: an identity shortcut needs C_out == C_in");
      final_bias = padded_bias(last_bias, at::Tensor(), last);
    }
    for (int i = 0; i + 1 < convs_per_block; ++i)
      convs[i].bias = padded_bias(biases[w_index + i], at::Tensor(), *convs[i].w);
    w_index += convs_per_block + projection;

    // Selection of this block: ranks of the selected cells per (image, group).
    const uint8_t* sel = sel_all + static_cast<size_t>(b) * batch * G * geo.cells();
    std::vector<int> rank(static_cast<size_t>(batch) * G * geo.cells(), -1);
    std::vector<int> count(G, 0);
    std::vector<Item> items_a, items_b_sel, items_b_rest;
    for (int g = 0; g < G; ++g)
      for (int n = 0; n < batch; ++n)
        for (int c = 0; c < geo.cells(); ++c) {
          const size_t key = (static_cast<size_t>(n) * G + g) * geo.cells() + c;
          const int pixels = geo.cell_pixels(c);
          const int r = sel[key] ? count[g]++ : -1;
          rank[key] = r;
          for (int begin = 0; begin < pixels; begin += CHUNK) {
            const Item item{n, c, g, begin, std::min(pixels, begin + CHUNK), r};
            if (r >= 0) {
              items_a.push_back(item);
              items_b_sel.push_back(item);
            } else {
              items_b_rest.push_back(item);
            }
          }
        }
    const int slots = *std::max_element(count.begin(), count.end());
    std::vector<Item> items_b = items_b_sel;  // heavy items first, then the light ones
    items_b.insert(items_b.end(), items_b_rest.begin(), items_b_rest.end());

    at::Tensor out = projection || !owned ? at::empty({batch, height, width, cout}, x_in.options())
                                          : cur;
    if (!projection && !owned) out.copy_(cur);  // identity on a borrowed input
    const float* xp = cur.data_ptr<float>();
    const int sc_panels = (cout / G + NR - 1) / NR;  // panels of one mask group's outputs
    float* op = out.data_ptr<float>();
    const Weights& first = *convs[0].w;
    const int c1 = first.out_groups * first.cout;
    size_t max_ch = std::max<size_t>(cx, cout);
    for (auto& c : convs) max_ch = std::max<size_t>(max_ch, c.w->out_groups * c.w->cout);
    const float* zeros = zero_row(max_ch);
    const int d = geo.dilation;

    // The k x k taps of pixel (y, x) of image n, mask group g: out[t * MR] = ptr(rank of
    // the neighbour's patch, its local index in that patch) where the neighbour is inside
    // the map and its patch selected for this block and group, else the zero row.
    // (Hot for the narrow stage-1 convolutions: no divisions, table lookups only.)
    const int* cell_row = geo.cell_row.data();
    const int* cell_col = geo.cell_col.data();
    const int* row_start = geo.row_start.data();
    const int* col_start = geo.col_start.data();
    auto taps_of = [&](int n, int g, int y, int x, int k, const float** out, auto&& ptr) {
      const int off = (k - 1) / 2;
      const int* rank_ng = rank.data() + (static_cast<size_t>(n) * G + g) * geo.cells();
      for (int ky = 0, t = 0; ky < k; ++ky) {
        const int yy = y + (ky - off) * d;
        const bool row_ok = yy >= 0 && yy < height;
        const int cy = row_ok ? cell_row[yy] : 0;
        const int ly = row_ok ? (yy - row_start[cy]) * geo.pw : 0;
        for (int kx = 0; kx < k; ++kx, ++t) {
          const int xx = x + (kx - off) * d;
          const float* s = zeros;
          if (row_ok && xx >= 0 && xx < width) {
            const int cx_ = cell_col[xx];
            const int rk = rank_ng[cy * geo.kw + cx_];
            if (rk >= 0) s = ptr(rk, yy, xx, ly + xx - col_start[cx_]);
          }
          out[t * MR] = s;
        }
      }
    };

    // ---- phase A: the first convolution on every selected pixel -> compact rows.
    at::Tensor compact = at::empty({static_cast<int64_t>(slots) * geo.pp + 1, c1},
                                   x_in.options());
    float* hp = compact.data_ptr<float>();
    run_items(static_cast<int64_t>(items_a.size()), 0, [&](int64_t i, Scratch& sc_) {
      const Item& it = items_a[i];
      const Weights& w = first;
      const int m = it.end - it.begin, tiles = (m + MR - 1) / MR;
      const int gpm = convs[0].groups_per_mask;
      sc_.src.assign(static_cast<size_t>(tiles) * w.taps * MR, zeros);
      sc_.outs.assign(static_cast<size_t>(tiles) * MR, nullptr);
      for (int jg = 0; jg < gpm; ++jg) {
        const int og = it.group * gpm + jg;
        const size_t in_off = static_cast<size_t>(og) * w.cin;
        for (int j = 0; j < m; ++j) {
          int y, x;
          geo.pixel(it.cell, it.begin + j, y, x);
          const int tl = j / MR, r = j % MR;
          sc_.outs[j] = hp + (static_cast<int64_t>(it.rank) * geo.pp + geo.local_of(y, x) + 1) *
                                 c1;
          const float** dst = sc_.src.data() + static_cast<size_t>(tl) * w.taps * MR + r;
          if (w.taps == 1) {
            *dst = xp + (it.image * hw + y * width + x) * cx + in_off;
          } else {  // a 3x3 first convolution reads the input of selected neighbours only
            taps_of(it.image, it.group, y, x, w.kernel, dst, [&](int, int yy, int xx, int) {
              return xp + (it.image * hw + yy * width + xx) * cx + in_off;
            });
          }
        }
        conv_rows(m, w, og, sc_.src.data(), nullptr, 0, nullptr,
                  convs[0].bias.data() + static_cast<size_t>(og) * w.panels * NR,
                  sc_.outs.data(), static_cast<size_t>(og) * w.cout, false, true);
      }
    });

    // ---- phase B: the rest of the block per patch chunk, and the block output.
    const int gc_out = cout / G;  // output channels of one mask group
    size_t half = 0;  // rows of the inner activations of a chunk, two buffers (ping-pong)
    for (int ci = 1; ci + 1 < convs_per_block; ++ci)
      half = std::max<size_t>(half, static_cast<size_t>(CHUNK) * convs[ci].groups_per_mask *
                                        convs[ci].w->cout);
    run_items(static_cast<int64_t>(items_b.size()), 2 * half, [&](int64_t i, Scratch& sc_) {
      const Item& it = items_b[i];
      const int m = it.end - it.begin, tiles = (m + MR - 1) / MR;
      sc_.outs.assign(static_cast<size_t>(tiles) * MR, nullptr);  // output pixel rows
      sc_.xrows.assign(static_cast<size_t>(tiles) * MR, zeros);
      for (int j = 0; j < m; ++j) {
        int y, x;
        geo.pixel(it.cell, it.begin + j, y, x);
        const int64_t row = it.image * hw + y * width + x;
        sc_.outs[j] = op + row * cout;
        sc_.xrows[j] = xp + row * cx;
      }
      const size_t col_out = static_cast<size_t>(it.group) * gc_out;
      if (it.rank < 0) {  // unselected: shortcut + b_last (+ ReLU) only
        const float* bias = final_bias.data() + static_cast<size_t>(it.group) * sc_panels * NR;
        if (projection) {
          conv_rows(m, *sc, it.group, sc_.xrows.data(), nullptr, 0, nullptr, bias,
                    sc_.outs.data(), col_out, false, last_relu);
        } else {  // in place on the identity: out = ReLU(x + b_last)
          const float floor = last_relu ? 0.f : -std::numeric_limits<float>::infinity();
          for (int j = 0; j < m; ++j) {
            float* o = sc_.outs[j] + col_out;
            for (int c = 0; c < gc_out; ++c) o[c] = std::max(o[c] + bias[c], floor);
          }
        }
        return;
      }
      // Selected: convolutions 2..L on the chunk, the first reading the compact rows.
      const float* in_base = nullptr;  // previous inner activation, (m, in_stride)
      int in_stride = 0;
      for (int ci = 1; ci < convs_per_block; ++ci) {
        const Weights& w = *convs[ci].w;
        const bool is_last = ci + 1 == convs_per_block;
        const int gpm = convs[ci].groups_per_mask;
        const int out_ch_g = gpm * w.cout;  // this conv's outputs in one mask group
        float* next = nullptr;
        if (!is_last) {
          next = sc_.buffer.get() + (in_base == sc_.buffer.get() ? half : 0);
          sc_.inner.assign(static_cast<size_t>(tiles) * MR, nullptr);
          for (int j = 0; j < m; ++j) sc_.inner[j] = next + static_cast<size_t>(j) * out_ch_g;
        }
        sc_.src.assign(static_cast<size_t>(tiles) * w.taps * MR, zeros);
        for (int jg = 0; jg < gpm; ++jg) {
          const int og = it.group * gpm + jg;
          const size_t in_off = static_cast<size_t>(og) * w.cin;
          for (int j = 0; j < m; ++j) {
            const int tl = j / MR, r = j % MR;
            const float** dst = sc_.src.data() + static_cast<size_t>(tl) * w.taps * MR + r;
            if (ci == 1) {  // reads the compact rows of phase A (neighbouring patches too)
              int y, x;
              geo.pixel(it.cell, it.begin + j, y, x);
              taps_of(it.image, it.group, y, x, w.kernel, dst, [&](int rk, int, int, int local) {
                return hp + (static_cast<int64_t>(rk) * geo.pp + local + 1) * c1 + in_off;
              });
            } else {
              *dst = in_base + static_cast<size_t>(j) * in_stride + jg * w.cin;
            }
          }
          if (!is_last) {
            conv_rows(m, w, og, sc_.src.data(), nullptr, 0, nullptr,
                      convs[ci].bias.data() + static_cast<size_t>(og) * w.panels * NR,
                      sc_.inner.data(), static_cast<size_t>(jg) * w.cout, false, true);
          } else {  // last conv: G groups (og == g); + shortcut, b_last, ReLU, scatter
            conv_rows(m, w, og, sc_.src.data(), projection ? sc.get() : nullptr, it.group,
                      sc_.xrows.data(),
                      final_bias.data() + static_cast<size_t>(it.group) * w.panels * NR,
                      sc_.outs.data(), col_out, !projection, last_relu);
          }
        }
        in_base = next;
        in_stride = out_ch_g;
      }
    });
    cur = out;
    owned = true;
  }
  return cur.permute({0, 3, 1, 2});
}

TORCH_LIBRARY(sar_native, m) {
  m.def("refine_stage(Tensor x, Tensor masks, Tensor[] weights, Tensor[] biases, "
        "int convs_per_block, int[] shortcuts, int[] last_relus, int dilation) -> Tensor");
}

TORCH_LIBRARY_IMPL(sar_native, CPU, m) { m.impl("refine_stage", &refine_stage_native); }
