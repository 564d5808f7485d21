// common.h: helpers for the kernels in this folder. Passed to mx.fast.metal_kernel as `header=`
// (it is pasted before the generated kernel signature), and compiled by the CPU checker after
// kernels/shim/metal_shim.h. Names carry a `va_` prefix because they share one translation unit
// with MLX's own preamble.

// Key slot `kp` (absolute position, -1 = empty slot) is visible to the query at absolute position
// `qp` iff 0 <= kp <= qp and, for a sliding-window layer (window > 0), qp - kp < window.
inline bool va_key_visible(int kp, int qp, int window) {
  return kp >= 0 && kp <= qp && (window == 0 || qp - kp < window);
}
