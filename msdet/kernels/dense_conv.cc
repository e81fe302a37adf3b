// A dense 2-D convolution (NCHW, float32, no bias, group 1) and its input and weight gradients on oneDNN 3
// (pip's onednn-cpu-gomp), for MindSpore's CPU "aot" Custom op.
//
// MindSpore 2.8 runs convolutions on its bundled oneDNN 2.2 with plain NCHW/OIHW memory, for which oneDNN picks
// its im2col + GEMM implementation ("gemm:jit"); PyTorch hands oneDNN 3 "any" layouts, gets the blocked direct
// kernels ("jit:avx512_core", nChw16c) and reorders around them. At NanoDet-Plus's aux-head 3x3 convs (8 x 192 x
// 40 x 40) that is 38/42/40 ms against 26/27/28 ms (forward, input gradient, weight gradient), 3-4x at its
// 192 -> 32 output convs (docs/performance.md). Here the layouts are oneDNN's choice, as in PyTorch, with the
// reorders from and to MindSpore's plain tensors inside the op.
//
// Threads: oneDNN runs single-threaded here (OpenMP's thread count is 1 while the op runs), and the batch is split
// into two pieces shared out by parallel_for (parallel.h). oneDNN's own OpenMP team waited at its barriers for a
// worker that MindSpore's busy threads kept off the cores, ~4 ms a call even for the smallest convs. Each piece
// is deterministic; the weight gradient is the pieces' partial sums added in piece order, so the bits do not
// depend on which thread ran which piece.
//
// Geometry: the entry point's name gives the stride (1 or 2) and the padding: "same" is TF's (MindSpore's
// pad_mode="same"), "half" is (K - 1) / 2 on every side; the output shape is the output tensor's, checked against
// them. (One name per geometry, as MindSpore keeps one shape function per Custom op name.) Primitives are created
// once per geometry and cached (graph shapes are static); they are stateless, so MindSpore's concurrent kernel
// threads share them, each call with its own workspace (blocked copies and scratchpads) and streams.
// Denormals: oneDNN runs with denormal inputs and results flushed to zero (MXCSR's DAZ and FTZ), as TensorFlow
// runs every op. Capped to AVX2, oneDNN's input gradient of the 3-channel stems (brgconv_strided) reads padding
// lanes whose stale values can be denormal: without the flush one of the two pieces took 660 ms instead of 9 at
// 320 px. Only values below 1.2e-38 are affected.
// Entry points (the aot signature): conv_fwd_<geometry>(x, w, y) and conv_bwd_<geometry>(x, w, dy, dx, dw),
// PyTorch's one convolution_backward with both gradients; convs_fwd_<geometry>(x_0..x_{L-1}, w, y_0..y_{L-1}) and
// convs_bwd_<geometry>(x_0.., w, dy_0.., dx_0.., dw) run one conv over the L levels of a head whose levels share
// it (NanoDet-Plus's aux head): the weights reordered once per call instead of once per level, the weight gradient
// summed over the levels in the op (level order; one MindSpore op each way instead of L, and no AddN). Each
// level's values are those of its own conv_* call.
#include <omp.h>
#include <xmmintrin.h>

#include <oneapi/dnnl/dnnl.hpp>

#include <algorithm>
#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "aot.h"
#include "parallel.h"

namespace {

using dnnl::memory;
using Dims = memory::dims;
using Key = std::array<int64_t, 14>;  // x dims, O, KH, KW, HO, WO, stride, pads (top, bottom, left, right)

constexpr int64_t kMacsPerThread = int64_t{1} << 23;

dnnl::engine &cpu() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// While it lives, this thread's OpenMP thread count is 1 (oneDNN reads it when it creates and runs primitives) and
// denormals are flushed to zero (MXCSR's FTZ and DAZ bits); both restored after.
class OneThread {
 public:
  OneThread() : previous_(omp_get_max_threads()), csr_(_mm_getcsr()) {
    omp_set_num_threads(1);
    _mm_setcsr(csr_ | kFlushDenormals);
  }
  ~OneThread() {
    _mm_setcsr(csr_);
    omp_set_num_threads(previous_);
  }

 private:
  static constexpr unsigned kFlushDenormals = 0x8040;  // FTZ (bit 15) and DAZ (bit 6)
  int previous_;
  unsigned csr_;
};

size_t padded(size_t bytes) { return (bytes + 63) / 64 * 64; }

// A primitive's input or output: MindSpore's plain tensor, and the layout the primitive wants; the reorder
// between them only where they differ.
struct Port {
  memory::desc plain, chosen;
  std::unique_ptr<dnnl::reorder> reorder;

  Port(const memory::desc &p, const memory::desc &c, bool input) : plain(p), chosen(c) {
    if (plain == chosen) return;
    reorder = std::make_unique<dnnl::reorder>(input ? dnnl::reorder::primitive_desc(cpu(), plain, cpu(), chosen)
                                                    : dnnl::reorder::primitive_desc(cpu(), chosen, cpu(), plain));
  }
  size_t bytes() const { return reorder ? padded(chosen.get_size()) : 0; }
};

// Bump allocation from one piece's share of the call's workspace.
struct Arena {
  char *next;
  void *take(size_t bytes) {
    void *p = next;
    next += padded(bytes);
    return p;
  }
};

struct Conv {
  dnnl::convolution_forward fwd;
  dnnl::convolution_backward_data bwd_data;
  dnnl::convolution_backward_weights bwd_weights;
  std::unique_ptr<Port> x, w, y;        // forward
  std::unique_ptr<Port> dy_d, w_d, dx;  // input gradient
  std::unique_ptr<Port> x_w, dy_w, dw;  // weight gradient
  size_t fwd_scratch = 0, bwd_scratch = 0;

  // workspace of one piece
  size_t fwd_bytes() const { return x->bytes() + y->bytes() + padded(fwd_scratch); }
  size_t bwd_bytes() const {
    return dy_d->bytes() + dx->bytes() + x_w->bytes() + dy_w->bytes() + dw->bytes() + padded(bwd_scratch) +
           padded(dw->plain.get_size());
  }
};

// The primitives of one geometry, created once (single-threaded, as they run).
const Conv &conv_for(const Key &k) {
  static std::mutex lock;
  static std::map<Key, std::unique_ptr<Conv>> cache;
  std::lock_guard<std::mutex> guard(lock);
  auto &slot = cache[k];
  if (slot) return *slot;
  const Dims xd{k[0], k[1], k[2], k[3]}, wd{k[4], k[1], k[5], k[6]}, yd{k[0], k[4], k[7], k[8]};
  const Dims strides{k[9], k[9]}, pad_l{k[10], k[12]}, pad_r{k[11], k[13]};
  using tag = memory::format_tag;
  const auto f32 = memory::data_type::f32;
  const memory::desc xp(xd, f32, tag::nchw), wp(wd, f32, tag::oihw), yp(yd, f32, tag::nchw);
  const memory::desc xa(xd, f32, tag::any), wa(wd, f32, tag::any), ya(yd, f32, tag::any);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const auto alg = dnnl::algorithm::convolution_direct;
  dnnl::convolution_forward::primitive_desc fpd(cpu(), dnnl::prop_kind::forward_training, alg, xa, wa, ya, strides,
                                                pad_l, pad_r, attr);
  dnnl::convolution_backward_data::primitive_desc dpd(cpu(), alg, xa, wa, ya, strides, pad_l, pad_r, fpd, attr);
  dnnl::convolution_backward_weights::primitive_desc wpd(cpu(), alg, xa, wa, ya, strides, pad_l, pad_r, fpd, attr);
  auto c = std::make_unique<Conv>(Conv{dnnl::convolution_forward(fpd), dnnl::convolution_backward_data(dpd),
                                       dnnl::convolution_backward_weights(wpd)});
  c->x = std::make_unique<Port>(xp, fpd.src_desc(), true);
  c->w = std::make_unique<Port>(wp, fpd.weights_desc(), true);
  c->y = std::make_unique<Port>(yp, fpd.dst_desc(), false);
  c->dy_d = std::make_unique<Port>(yp, dpd.diff_dst_desc(), true);
  c->w_d = std::make_unique<Port>(wp, dpd.weights_desc(), true);
  c->dx = std::make_unique<Port>(xp, dpd.diff_src_desc(), false);
  c->x_w = std::make_unique<Port>(xp, wpd.src_desc(), true);
  c->dy_w = std::make_unique<Port>(yp, wpd.diff_dst_desc(), true);
  c->dw = std::make_unique<Port>(wp, wpd.diff_weights_desc(), false);
  c->fwd_scratch = fpd.scratchpad_desc().get_size();
  c->bwd_scratch = std::max(dpd.scratchpad_desc().get_size(), wpd.scratchpad_desc().get_size());
  slot = std::move(c);
  return *slot;
}

// One piece's calls on its own stream and arena.
struct Run {
  dnnl::stream stream;
  Arena arena;

  // the primitive's view of a plain input: the input itself, or its reordered copy
  memory in(const Port &p, const float *data) {
    memory plain(p.plain, cpu(), const_cast<float *>(data));
    if (!p.reorder) return plain;
    memory chosen(p.chosen, cpu(), arena.take(p.chosen.get_size()));
    p.reorder->execute(stream, plain, chosen);
    return chosen;
  }
  // where the primitive writes a plain output: the output itself, or a copy reordered into it by finish()
  memory out(const Port &p, float *data) {
    if (!p.reorder) return memory(p.plain, cpu(), data);
    return memory(p.chosen, cpu(), arena.take(p.chosen.get_size()));
  }
  void finish(const Port &p, memory written, float *data) {
    if (!p.reorder) return;
    memory plain(p.plain, cpu(), data);
    p.reorder->execute(stream, written, plain);
  }
  memory scratch(size_t bytes) {
    return memory({{static_cast<int64_t>(std::max<size_t>(bytes, 1))}, memory::data_type::u8, memory::format_tag::a},
                  cpu(), arena.take(bytes));
  }
};

// Per-thread memory for a call's workspace, grown as needed and kept (no page faults per call).
char *workspace(size_t bytes) {
  thread_local std::vector<float> buffer;
  if (bytes > buffer.size() * sizeof(float)) buffer.assign(bytes / sizeof(float) + 16, 0.0f);
  return reinterpret_cast<char *>(buffer.data());
}

// Padding before and after along one axis: TF "same" (the total that gives `out` outputs, the extra pixel after),
// as MindSpore's pad_mode="same", or (k - 1) / 2 on both sides.
std::array<int64_t, 2> pads(int64_t in, int64_t out, int64_t k, int64_t stride, bool same) {
  if (!same) return {(k - 1) / 2, (k - 1) / 2};
  const int64_t total = std::max<int64_t>((out - 1) * stride + k - in, 0);
  return {total / 2, total - total / 2};
}

// x: [N, C, H, W], w: [O, C, KH, KW], y: [N, O, HO, WO].
bool key_of(int *ndims, int64_t **shapes, int64_t stride, bool same, int x, int w, int y, Key *k) {
  if (ndims[x] != 4 || ndims[w] != 4 || ndims[y] != 4) return false;
  const int64_t *xs = shapes[x], *ws = shapes[w], *ys = shapes[y];
  if (ws[1] != xs[1] || ys[0] != xs[0] || ys[1] != ws[0]) return false;
  const auto ph = pads(xs[2], ys[2], ws[2], stride, same), pw = pads(xs[3], ys[3], ws[3], stride, same);
  for (int d = 0; d < 2; ++d) {  // the output size these paddings give must be the output tensor's
    const int64_t in = xs[2 + d], kk = ws[2 + d], before = d ? pw[0] : ph[0], after = d ? pw[1] : ph[1];
    if ((in + before + after - kk) / stride + 1 != ys[2 + d]) return false;
  }
  *k = Key{xs[0], xs[1], xs[2], xs[3], ws[0], ws[2], ws[3], ys[2], ys[3], stride, ph[0], ph[1], pw[0], pw[1]};
  return true;
}

// The batch split: two equal pieces when the conv is big enough and the batch even, else one. Two on any machine,
// so that the weight gradient's bits do not depend on the core count (one core runs both pieces in turn).
int64_t pieces(const Key &k) {
  const int64_t macs = k[0] * k[4] * k[1] * k[5] * k[6] * k[7] * k[8];
  return macs >= 2 * kMacsPerThread && k[0] % 2 == 0 ? 2 : 1;
}

// One level of a call: its geometry, its batch pieces and their primitives.
struct Level {
  Key key;
  int64_t pieces;
  const Conv *conv;
};

// Runs fn(level, conv, weights, run, piece, x offset, y offset) for each level of the call in turn and each piece
// of its batch, on parallel_for's threads, then after(level, pieces) on this thread: the primitives of one piece;
// the weights reordered once per layout the levels' primitives want (the forward's or the input gradient's),
// shared by all levels and pieces; each piece its own arena (reused by the next level) and stream, OpenMP at one
// thread.
template <class Fn, class After>
void for_each_piece(const std::vector<Key> &keys, bool grad, const float *w, Fn fn, After after) {
  OneThread one;
  std::vector<Level> levels;
  size_t w_bytes = 0, piece_bytes = 0;
  for (const Key &key : keys) {
    const int64_t n = pieces(key);
    Key piece_key = key;
    piece_key[0] = key[0] / n;
    const Conv &c = conv_for(piece_key);
    levels.push_back({key, n, &c});
    w_bytes += (grad ? *c.w_d : *c.w).bytes();
    piece_bytes = std::max(piece_bytes, static_cast<size_t>(n) * (grad ? c.bwd_bytes() : c.fwd_bytes()));
  }
  char *ws = workspace(w_bytes + piece_bytes);
  Run shared{dnnl::stream(cpu()), Arena{ws}};
  std::vector<memory> reordered;  // the weights in each layout made so far
  for (size_t l = 0; l < levels.size(); ++l) {
    const Level &level = levels[l];
    const Conv &c = *level.conv;
    const Port &wp = grad ? *c.w_d : *c.w;
    memory wm(wp.plain, cpu(), const_cast<float *>(w));
    if (wp.reorder) {
      auto made = std::find_if(reordered.begin(), reordered.end(),
                               [&](const memory &m) { return m.get_desc() == wp.chosen; });
      if (made == reordered.end()) {
        reordered.push_back(shared.in(wp, w));
        shared.stream.wait();
        made = reordered.end() - 1;
      }
      wm = *made;
    }
    const int64_t n = level.pieces, batch = level.key[0] / n;
    const int64_t x_step = batch * level.key[1] * level.key[2] * level.key[3];
    const int64_t y_step = batch * level.key[4] * level.key[7] * level.key[8];
    const size_t each = grad ? c.bwd_bytes() : c.fwd_bytes();
    parallel_for(n, n - 1, 1, [&](int64_t i) {  // one thread per piece, none spare
      OneThread own;
      Run run{dnnl::stream(cpu()), Arena{ws + w_bytes + i * each}};
      fn(l, c, wm, run, i, i * x_step, i * y_step);
      run.stream.wait();
    }, 1);
    after(l, n);
  }
}

// The levels of a call with `count` levels: tensor x_l at params[x + l], the weights at params[w], y_l at params[y + l].
bool keys_of(int count, int64_t stride, bool same, int *ndims, int64_t **shapes, int x, int w, int y,
             std::vector<Key> *keys) {
  keys->resize(count);
  for (int l = 0; l < count; ++l) {
    if (!key_of(ndims, shapes, stride, same, x + l, w, y + l, &(*keys)[l])) return false;
  }
  return true;
}

// conv(x_l, w) -> y_l for the L levels of a call: x_0..x_{L-1}, w, y_0..y_{L-1} (2L + 1 tensors).
int forward(int64_t stride, bool same, int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  const int count = (nparam - 1) / 2;
  if (count < 1 || !float32_args(nparam, 2 * count + 1, dtypes)) return 1;
  std::vector<Key> keys;
  if (!keys_of(count, stride, same, ndims, shapes, 0, count, count + 1, &keys)) return 1;
  const auto *w = static_cast<const float *>(params[count]);
  try {
    for_each_piece(keys, false, w, [&](size_t l, const Conv &c, memory &wm, Run &run, int64_t, int64_t xo,
                                       int64_t yo) {
      const auto *x = static_cast<const float *>(params[l]);
      auto *y = static_cast<float *>(params[count + 1 + l]);
      memory xm = run.in(*c.x, x + xo);
      memory ym = run.out(*c.y, y + yo);
      c.fwd.execute(run.stream, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_DST, ym},
                                 {DNNL_ARG_SCRATCHPAD, run.scratch(c.fwd_scratch)}});
      run.finish(*c.y, ym, y + yo);
    }, [](size_t, int64_t) {});
  } catch (const dnnl::error &) {
    return 1;
  }
  return 0;
}

// Both gradients for the L levels of a call: x_0..x_{L-1}, w, dy_0..dy_{L-1} -> dx_0..dx_{L-1}, dw (3L + 2
// tensors). dw is the levels' weight gradients added in level order, each the sum of its pieces' in piece order.
int backward(int64_t stride, bool same, int nparam, void **params, int *ndims, int64_t **shapes,
             const char **dtypes) {
  const int count = (nparam - 2) / 3;
  if (count < 1 || !float32_args(nparam, 3 * count + 2, dtypes)) return 1;
  std::vector<Key> keys;
  if (!keys_of(count, stride, same, ndims, shapes, 0, count, count + 1, &keys)) return 1;
  const auto *w = static_cast<const float *>(params[count]);
  auto *dw = static_cast<float *>(params[3 * count + 1]);
  for (int l = 0; l < count; ++l) {  // dx_l is x_l's shape
    if (ndims[2 * count + 1 + l] != 4 || numel(4, shapes[2 * count + 1 + l]) != numel(4, shapes[l])) return 1;
  }
  const int64_t w_size = keys[0][4] * keys[0][1] * keys[0][5] * keys[0][6];
  thread_local std::vector<float> level_dw;  // the weight gradient of levels after the first (this thread's)
  if (count > 1) level_dw.resize(w_size);
  float *const later_dw = level_dw.data();
  std::vector<float *> partial(2);  // piece i's weight gradient: the level's own buffer for piece 0
  try {
    for_each_piece(keys, true, w, [&](size_t l, const Conv &c, memory &wm, Run &run, int64_t i, int64_t xo,
                                      int64_t yo) {
      const auto *x = static_cast<const float *>(params[l]);
      const auto *dy = static_cast<const float *>(params[count + 1 + l]);
      auto *dx = static_cast<float *>(params[2 * count + 1 + l]);
      float *level_out = l == 0 ? dw : later_dw;
      partial[i] = i == 0 ? level_out : static_cast<float *>(run.arena.take(w_size * sizeof(float)));
      memory dy_d = run.in(*c.dy_d, dy + yo);
      memory dxm = run.out(*c.dx, dx + xo);
      memory scratch = run.scratch(c.bwd_scratch);
      c.bwd_data.execute(run.stream, {{DNNL_ARG_DIFF_DST, dy_d}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_DIFF_SRC, dxm},
                                      {DNNL_ARG_SCRATCHPAD, scratch}});
      run.finish(*c.dx, dxm, dx + xo);
      memory xm = run.in(*c.x_w, x + xo);
      memory dy_w = c.dy_w->chosen == c.dy_d->chosen ? dy_d : run.in(*c.dy_w, dy + yo);
      memory dwm = run.out(*c.dw, partial[i]);
      c.bwd_weights.execute(run.stream, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_DIFF_DST, dy_w},
                                         {DNNL_ARG_DIFF_WEIGHTS, dwm}, {DNNL_ARG_SCRATCHPAD, scratch}});
      run.finish(*c.dw, dwm, partial[i]);
    }, [&](size_t l, int64_t n) {
      for (int64_t i = 1; i < n; ++i) {
        for (int64_t j = 0; j < w_size; ++j) partial[0][j] += partial[i][j];
      }
      if (l == 0) return;
      for (int64_t j = 0; j < w_size; ++j) dw[j] += later_dw[j];
    });
  } catch (const dnnl::error &) {
    return 1;
  }
  return 0;
}

}  // namespace

#define MSDET_DENSECONV(name, S, SAME)                                                                      \
  extern "C" int conv_fwd_##name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, \
                                 void *, void *) {                                                       \
    return nparam == 3 ? forward(S, SAME, nparam, params, ndims, shapes, dtypes) : 1;                    \
  }                                                                                                     \
  extern "C" int conv_bwd_##name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, \
                                 void *, void *) {                                                       \
    return nparam == 5 ? backward(S, SAME, nparam, params, ndims, shapes, dtypes) : 1;                   \
  }                                                                                                     \
  extern "C" int convs_fwd_##name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, \
                                  void *, void *) {                                                      \
    return forward(S, SAME, nparam, params, ndims, shapes, dtypes);                                     \
  }                                                                                                     \
  extern "C" int convs_bwd_##name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, \
                                  void *, void *) {                                                      \
    return backward(S, SAME, nparam, params, ndims, shapes, dtypes);                                    \
  }

// s{stride}_{same: TF "same" padding | half: (K - 1) / 2 on every side}
MSDET_DENSECONV(s1_same, 1, true)
MSDET_DENSECONV(s2_same, 2, true)
MSDET_DENSECONV(s1_half, 1, false)
MSDET_DENSECONV(s2_half, 2, false)
