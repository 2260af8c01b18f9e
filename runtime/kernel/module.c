/* Python binding of the kernel: argument checks (every size, dtype and index handed from Python is
 * verified here, violations raise ValueError/TypeError), GIL released during compute.
 * No numpy C API: arrays come in through the buffer protocol; outputs are caller-allocated. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernel.h"

static const char *ACTIVE_NAME;
static const dot_fn *ACTIVE_TABLE;
static const dot2x2_fn *ACTIVE_TABLE2;
static const gemm_kernel *ACTIVE_GEMM;

/* ---- buffer helpers ---------------------------------------------------------------------- */

/* Element format of a buffer with PyBUF_FORMAT: strip byte-order prefixes "@=<". Only native
 * little-endian layouts are accepted (every supported target is little-endian). */
static char buf_kind(const Py_buffer *v) {
    const char *f = v->format ? v->format : "B";
    while (*f == '@' || *f == '=' || *f == '<') f++;
    return f[0] && !f[1] ? f[0] : '?';
}

static int get_raw(PyObject *o, Py_buffer *v, const char *what) {
    if (PyObject_GetBuffer(o, v, PyBUF_C_CONTIGUOUS) != 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s must be a C-contiguous bytes-like buffer (got %s)", what,
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    return 0;
}

/* A contiguous float32 buffer of exactly n elements (writable if asked). */
static int get_f32(PyObject *o, Py_buffer *v, Py_ssize_t n, int writable, const char *what) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(o, v, flags) != 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s must be a C-contiguous%s float32 array (got %s)", what,
                     writable ? " writable" : "", Py_TYPE(o)->tp_name);
        return -1;
    }
    if (buf_kind(v) != 'f' || v->itemsize != 4) {
        PyErr_Format(PyExc_TypeError, "%s must have dtype float32 (buffer format '%s')", what,
                     v->format ? v->format : "B");
        PyBuffer_Release(v);
        return -1;
    }
    if (v->len != n * 4) {
        PyErr_Format(PyExc_ValueError, "%s has %zd elements, expected %zd", what, v->len / 4, n);
        PyBuffer_Release(v);
        return -1;
    }
    return 0;
}

/* Index of the first NaN or infinity in x[0..n), or n. A value is non-finite iff its exponent
 * bits are all ones, i.e. iff (bits & 0x7fffffff) + 0x00800000 carries into bit 31: OR-ing that
 * over a chunk is branch-free integer work the compiler vectorizes (the early-exit isfinite loop
 * it does not: 0.45 ns per value, a fifth of a 9-row matmul's time on a small matrix); only a
 * flagged chunk is searched value by value. */
static size_t first_non_finite(const float *x, size_t n) {
    enum { CHUNK = 1024 };
    for (size_t c = 0; c < n; c += CHUNK) {
        const size_t end = n - c < CHUNK ? n : c + CHUNK;
        uint32_t any = 0;
        for (size_t i = c; i < end; i++) {
            uint32_t bits;
            memcpy(&bits, x + i, sizeof bits);
            any |= (bits & 0x7fffffffu) + 0x00800000u;
        }
        if (any & 0x80000000u)
            for (size_t i = c; i < end; i++)
                if (!isfinite(x[i])) return i;
    }
    return n;
}

static int check_finite(const float *x, size_t n, const char *what) {
    const size_t i = first_non_finite(x, n);
    if (i == n) return 0;
    PyErr_Format(PyExc_ValueError, "%s contains NaN or infinity at element %zu", what, i);
    return -1;
}

/* Type, K and rows against the raw weight buffer; sets *t and *nb. */
static int check_matrix(int gtype, int rows, int K, const Py_buffer *w, const gtype_info **t, int *nb) {
    *t = kernel_type_info(gtype);
    if (!*t) {
        PyErr_Format(PyExc_ValueError, "GGML type %d is not supported by the kernel (Q4_0=2, Q4_1=3, "
                     "Q8_0=8, Q4_K=12, Q6_K=14, packed Q4_0=1002, Q8_0=1008, Q4_K=1012)", gtype);
        return -1;
    }
    if (rows < 1 || K < 1) {
        PyErr_Format(PyExc_ValueError, "rows (%d) and K (%d) must be >= 1", rows, K);
        return -1;
    }
    if (K % (*t)->block_values != 0) {
        PyErr_Format(PyExc_ValueError, "K=%d is not a multiple of the block size %d", K, (*t)->block_values);
        return -1;
    }
    *nb = K / (*t)->block_values;
    const size_t want = (size_t)rows * (size_t)*nb * (size_t)(*t)->block_bytes;
    if ((size_t)w->len != want) {
        PyErr_Format(PyExc_ValueError, "weight buffer has %zd bytes, expected rows*row_bytes = %d*%zu = %zu",
                     w->len, rows, (size_t)*nb * (*t)->block_bytes, want);
        return -1;
    }
    return 0;
}

/* ---- compute ------------------------------------------------------------------------------- */

static PyObject *py_matvec(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *wo, *xo, *yo;
    int gtype, rows, K, nb, rc = 0;
    if (!PyArg_ParseTuple(args, "OiiiOO", &wo, &gtype, &rows, &K, &xo, &yo)) return NULL;
    Py_buffer w, x, y;
    const gtype_info *t;
    if (get_raw(wo, &w, "weights") != 0) return NULL;
    if (check_matrix(gtype, rows, K, &w, &t, &nb) != 0) goto fail_w;
    if (get_f32(xo, &x, K, 0, "x") != 0) goto fail_w;
    if (get_f32(yo, &y, rows, 1, "out") != 0) goto fail_x;
    if (check_finite(x.buf, (size_t)K, "x") != 0) goto fail_y;
    const dot_fn *table = ACTIVE_TABLE;
    Py_BEGIN_ALLOW_THREADS
    rc = run_matvec(table, t, w.buf, rows, K, x.buf, y.buf);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&y);
    PyBuffer_Release(&x);
    PyBuffer_Release(&w);
    if (rc != 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
fail_y:
    PyBuffer_Release(&y);
fail_x:
    PyBuffer_Release(&x);
fail_w:
    PyBuffer_Release(&w);
    return NULL;
}

static PyObject *py_matmul(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *wo, *xo, *yo;
    int gtype, rows, K, M, nb, rc = 0, exact = 0;
    if (!PyArg_ParseTuple(args, "OiiiOiO|p", &wo, &gtype, &rows, &K, &xo, &M, &yo, &exact)) return NULL;
    if (M < 1) {
        PyErr_Format(PyExc_ValueError, "M=%d must be >= 1", M);
        return NULL;
    }
    Py_buffer w, x, y;
    const gtype_info *t;
    if (get_raw(wo, &w, "weights") != 0) return NULL;
    if (check_matrix(gtype, rows, K, &w, &t, &nb) != 0) goto fail_w;
    if (get_f32(xo, &x, (Py_ssize_t)M * K, 0, "X") != 0) goto fail_w;
    if (get_f32(yo, &y, (Py_ssize_t)M * rows, 1, "out") != 0) goto fail_x;
    if (check_finite(x.buf, (size_t)M * K, "X") != 0) goto fail_y;
    const dot_fn *table = ACTIVE_TABLE;
    const dot2x2_fn *table2 = exact ? NULL : ACTIVE_TABLE2; /* exact: each row's bits are its matvec's */
    const gemm_kernel *gemm = exact ? NULL : ACTIVE_GEMM;
    Py_BEGIN_ALLOW_THREADS
    rc = run_matmul(table, table2, gemm, t, w.buf, rows, K, x.buf, M, y.buf);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&y);
    PyBuffer_Release(&x);
    PyBuffer_Release(&w);
    if (rc != 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
fail_y:
    PyBuffer_Release(&y);
fail_x:
    PyBuffer_Release(&x);
fail_w:
    PyBuffer_Release(&w);
    return NULL;
}

/* A K or V cache of exactly n elements, C-contiguous: fp16 (numpy float16 'e' or uint16 'H'),
 * float32 'f', or (allow_i8) int8 'b'. Sets *kind to KV_F16 / KV_F32 / KV_I8. */
static int get_cache_buf(PyObject *o, Py_buffer *v, Py_ssize_t n, int allow_i8, int writable, int *kind,
                         const char *what) {
    if (PyObject_GetBuffer(o, v, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) != 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s must be a C-contiguous%s float16/uint16/float32%s array (got %s)", what,
                     writable ? " writable" : "", allow_i8 ? "/int8" : "", Py_TYPE(o)->tp_name);
        return -1;
    }
    const char c = buf_kind(v);
    if ((c == 'e' || c == 'H') && v->itemsize == 2) {
        *kind = KV_F16;
    } else if (c == 'f' && v->itemsize == 4) {
        *kind = KV_F32;
    } else if (allow_i8 && c == 'b' && v->itemsize == 1) {
        *kind = KV_I8;
    } else {
        PyErr_Format(PyExc_TypeError, "%s must have dtype float16, uint16, float32%s (buffer format '%s')", what,
                     allow_i8 ? " or int8" : "", v->format ? v->format : "B");
        PyBuffer_Release(v);
        return -1;
    }
    if (v->len != n * v->itemsize) {
        PyErr_Format(PyExc_ValueError, "%s has %zd elements, expected %zd", what, v->len / v->itemsize, n);
        PyBuffer_Release(v);
        return -1;
    }
    return 0;
}

static int get_cache(PyObject *o, Py_buffer *v, Py_ssize_t n, int allow_i8, int *kind, const char *what) {
    return get_cache_buf(o, v, n, allow_i8, 0, kind, what);
}

static int overlaps(const Py_buffer *a, const Py_buffer *b) {
    const char *a0 = a->buf, *b0 = b->buf;
    return a0 < b0 + b->len && b0 < a0 + a->len;
}

/* One layer's KV cache as the bindings take it: k, v [KV, n_ctx, hd] of one kind (fp16, float32
 * or int8) and, with (and only with) an int8 cache, fp16 scales ks, vs [KV, n_ctx]. */
typedef struct {
    Py_buffer k, v, ks, vs; /* ks.buf, vs.buf NULL unless int8 */
    int kind;               /* KV_* */
} kv_views;

static void release_kv(kv_views *c) {
    if (c->ks.buf) PyBuffer_Release(&c->vs), PyBuffer_Release(&c->ks);
    PyBuffer_Release(&c->v);
    PyBuffer_Release(&c->k);
}

/* 0, or -1 with the exception set and no view held. */
static int get_kv(PyObject *ko, PyObject *vo, PyObject *kso, PyObject *vso, int KV, int n_ctx, int hd, int writable,
                  kv_views *c) {
    const Py_ssize_t n_cache = (Py_ssize_t)KV * n_ctx * hd, n_scale = (Py_ssize_t)KV * n_ctx; /* fit 64 bits */
    int vk, sk;
    c->ks.buf = c->vs.buf = NULL;
    if (get_cache_buf(ko, &c->k, n_cache, 1, writable, &c->kind, "k") != 0) return -1;
    if (get_cache_buf(vo, &c->v, n_cache, 1, writable, &vk, "v") != 0) goto fail_k;
    if (c->kind != vk) {
        PyErr_SetString(PyExc_TypeError, "k and v must have the same dtype");
        goto fail_v;
    }
    if ((c->kind == KV_I8) != (kso != Py_None) || (c->kind == KV_I8) != (vso != Py_None)) {
        PyErr_SetString(PyExc_ValueError, "k_scale and v_scale go with (and only with) an int8 cache");
        goto fail_v;
    }
    if (c->kind != KV_I8) return 0;
    if (get_cache_buf(kso, &c->ks, n_scale, 0, writable, &sk, "k_scale") != 0) goto fail_v;
    if (sk != KV_F16) {
        PyErr_SetString(PyExc_TypeError, "k_scale must be float16 [kv_heads, n_ctx]");
        goto fail_ks;
    }
    if (get_cache_buf(vso, &c->vs, n_scale, 0, writable, &sk, "v_scale") != 0) goto fail_ks;
    if (sk != KV_F16) {
        PyErr_SetString(PyExc_TypeError, "v_scale must be float16 [kv_heads, n_ctx]");
        PyBuffer_Release(&c->vs);
        goto fail_ks;
    }
    return 0;
fail_ks:
    PyBuffer_Release(&c->ks);
fail_v:
    PyBuffer_Release(&c->v);
fail_k:
    PyBuffer_Release(&c->k);
    return -1;
}

/* attention(q, k, v, H, KV, hd, n_ctx, lo, hi, out): decode attention of one token, see kernel.h. */
static PyObject *py_attention(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *qo, *ko, *vo, *oo;
    int H, KV, hd, n_ctx, lo, hi, k16, v16, rc = 0;
    if (!PyArg_ParseTuple(args, "OOOiiiiiiO", &qo, &ko, &vo, &H, &KV, &hd, &n_ctx, &lo, &hi, &oo)) return NULL;
    if (H < 1 || KV < 1 || hd < 1 || n_ctx < 1 || H > 65536 || hd > 65536) {
        PyErr_Format(PyExc_ValueError, "heads (%d), kv_heads (%d), head_dim (%d), n_ctx (%d) must be >= 1 "
                     "(heads, head_dim <= 65536)", H, KV, hd, n_ctx);
        return NULL;
    }
    if (H % KV != 0) {
        PyErr_Format(PyExc_ValueError, "heads (%d) is not a multiple of kv_heads (%d)", H, KV);
        return NULL;
    }
    if (lo < 0 || hi <= lo || hi > n_ctx) {
        PyErr_Format(PyExc_ValueError, "positions [%d, %d) are not a non-empty range within the cache's "
                     "%d positions", lo, hi, n_ctx);
        return NULL;
    }
    const Py_ssize_t n_cache = (Py_ssize_t)KV * n_ctx * hd; /* each factor < 2^31: fits 64 bits */
    Py_buffer q, k, v, out;
    if (get_f32(qo, &q, (Py_ssize_t)H * hd, 0, "q") != 0) return NULL;
    if (get_cache(ko, &k, n_cache, 0, &k16, "k") != 0) goto fail_q;
    if (get_cache(vo, &v, n_cache, 0, &v16, "v") != 0) goto fail_k;
    if (k16 != v16) {
        PyErr_SetString(PyExc_TypeError, "k and v must have the same element size (both fp16 or both float32)");
        goto fail_v;
    }
    if (get_f32(oo, &out, (Py_ssize_t)H * hd, 1, "out") != 0) goto fail_v;
    if (overlaps(&out, &k) || overlaps(&out, &v) || overlaps(&out, &q)) {
        PyErr_SetString(PyExc_ValueError, "out must not overlap q, k or v");
        goto fail_out;
    }
    if (check_finite(q.buf, (size_t)H * hd, "q") != 0) goto fail_out;
    /* positions [lo, hi) = the window of hi - lo keys ending at the one query row, pos = hi - 1 */
    const attention_args a = {.q = q.buf, .q_stride = H * hd, .k = k.buf, .v = v.buf, .out = out.buf, .H = H,
                              .KV = KV, .hd = hd, .n_ctx = n_ctx, .kind = k16, .T = 1, .pos = hi - 1,
                              .window = hi - lo, .scale = 1.0f / sqrtf((float)hd), .sparse = NULL};
    const int simd = strcmp(ACTIVE_NAME, "scalar") != 0;
    Py_BEGIN_ALLOW_THREADS
    rc = run_attention(&a, simd);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&out);
    PyBuffer_Release(&v);
    PyBuffer_Release(&k);
    PyBuffer_Release(&q);
    if (rc != 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
fail_out:
    PyBuffer_Release(&out);
fail_v:
    PyBuffer_Release(&v);
fail_k:
    PyBuffer_Release(&k);
fail_q:
    PyBuffer_Release(&q);
    return NULL;
}

/* q for attention_rows: a 2-D float32 array [T, >= need] whose rows may be strided (a column slice
 * of the fused qkv rows), elements contiguous within a row; *stride in floats, *extent in bytes. */
static int get_q_rows(PyObject *o, Py_buffer *v, Py_ssize_t need, int *T, int *stride, Py_ssize_t *extent) {
    if (PyObject_GetBuffer(o, v, PyBUF_STRIDES | PyBUF_FORMAT) != 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "q must be a 2-D float32 array (got %s)", Py_TYPE(o)->tp_name);
        return -1;
    }
    if (buf_kind(v) != 'f' || v->itemsize != 4 || v->ndim != 2) {
        PyErr_Format(PyExc_ValueError, "q must be a 2-D float32 array [rows, >= heads*head_dim] (format '%s', "
                     "%d dims)", v->format ? v->format : "B", v->ndim);
        goto fail;
    }
    if (v->shape[0] < 1 || v->shape[0] > INT_MAX || v->shape[1] < need) {
        PyErr_Format(PyExc_ValueError, "q has shape (%zd, %zd): needs >= 1 rows of >= heads*head_dim = %zd values",
                     v->shape[0], v->shape[1], need);
        goto fail;
    }
    if (v->strides[1] != 4 || v->strides[0] % 4 != 0 || v->strides[0] / 4 < need || v->strides[0] / 4 > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "q's rows must be contiguous float32 values with a positive row stride of "
                     ">= heads*head_dim = %zd floats (strides %zd, %zd bytes)", need, v->strides[0], v->strides[1]);
        goto fail;
    }
    *T = (int)v->shape[0];
    *stride = (int)(v->strides[0] / 4);
    *extent = (v->shape[0] - 1) * v->strides[0] + v->shape[1] * 4;
    return 0;
fail:
    PyBuffer_Release(v);
    return -1;
}

/* attention_rows(q, k, v, k_scale, v_scale, H, KV, hd, n_ctx, pos, window, scale, sparse, out):
 * T query rows at positions pos..pos+T-1, see kernel.h. k_scale/v_scale: None, or fp16 [KV, n_ctx]
 * for an int8 cache; sparse: None or (block, local_blocks, vert_stride, head_step). */
static PyObject *py_attention_rows(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *qo, *ko, *vo, *kso, *vso, *so, *oo;
    int H, KV, hd, n_ctx, pos, window, T = 0, stride = 0, rc = 0;
    double scale;
    if (!PyArg_ParseTuple(args, "OOOOOiiiiiidOO", &qo, &ko, &vo, &kso, &vso, &H, &KV, &hd, &n_ctx, &pos, &window,
                          &scale, &so, &oo))
        return NULL;
    if (H < 1 || KV < 1 || hd < 1 || n_ctx < 1 || H > 65536 || hd > 65536) {
        PyErr_Format(PyExc_ValueError, "heads (%d), kv_heads (%d), head_dim (%d), n_ctx (%d) must be >= 1 "
                     "(heads, head_dim <= 65536)", H, KV, hd, n_ctx);
        return NULL;
    }
    block_sparse sp = {0, 0, 0, 0};
    if (so != Py_None) {
        if (!PyTuple_Check(so) || !PyArg_ParseTuple(so, "iiii", &sp.block, &sp.local_blocks, &sp.vert_stride,
                                                    &sp.head_step)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_ValueError, "sparse must be None or a tuple of 4 ints (block, local_blocks, "
                            "vert_stride, head_step)");
            return NULL;
        }
    }
    Py_buffer q, out;
    kv_views c;
    Py_ssize_t q_extent;
    if (get_q_rows(qo, &q, (Py_ssize_t)H * hd, &T, &stride, &q_extent) != 0) return NULL;
    if (get_kv(ko, vo, kso, vso, KV, n_ctx, hd, 0, &c) != 0) goto fail_q;
    if (get_f32(oo, &out, (Py_ssize_t)T * H * hd, 1, "out") != 0) goto fail_kv;
    const Py_buffer q_span = {.buf = q.buf, .len = q_extent};
    if (overlaps(&out, &q_span) || overlaps(&out, &c.k) || overlaps(&out, &c.v) ||
        (c.ks.buf && (overlaps(&out, &c.ks) || overlaps(&out, &c.vs)))) {
        PyErr_SetString(PyExc_ValueError, "out must not overlap q, k, v or the scales");
        goto fail_out;
    }
    const attention_args a = {.q = q.buf, .q_stride = stride, .k = c.k.buf, .v = c.v.buf, .k_scale = c.ks.buf,
                              .v_scale = c.vs.buf, .out = out.buf, .H = H, .KV = KV, .hd = hd, .n_ctx = n_ctx,
                              .kind = c.kind, .T = T, .pos = pos, .window = window, .scale = (float)scale,
                              .sparse = so != Py_None ? &sp : NULL};
    const char *why = attention_args_error(&a);
    if (why) {
        PyErr_Format(PyExc_ValueError, "%s (heads %d, kv_heads %d, head_dim %d, n_ctx %d, rows %d, pos %d, "
                     "window %d, scale %g, sparse (%d, %d, %d, %d))", why, H, KV, hd, n_ctx, T, pos, window, scale,
                     sp.block, sp.local_blocks, sp.vert_stride, sp.head_step);
        goto fail_out;
    }
    for (int t = 0; t < T; t++)
        if (check_finite((const float *)q.buf + (size_t)t * stride, (size_t)H * hd, "q") != 0) goto fail_out;
    const int simd = strcmp(ACTIVE_NAME, "scalar") != 0;
    Py_BEGIN_ALLOW_THREADS
    rc = run_attention(&a, simd);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        PyErr_NoMemory();
        goto fail_out;
    }
    PyBuffer_Release(&out);
    release_kv(&c);
    PyBuffer_Release(&q);
    Py_RETURN_NONE;
fail_out:
    PyBuffer_Release(&out);
fail_kv:
    release_kv(&c);
fail_q:
    PyBuffer_Release(&q);
    return NULL;
}

/* kv_store(qkv, H, KV, hd, k, v, k_scale, v_scale, n_ctx, pos): the keys and values of T rows of
 * fused qkv [T, >= (H + 2 KV) hd] (rows [q | k | v], may be strided) into one layer's cache k, v
 * [KV, n_ctx, hd] (fp16, float32, or int8 with fp16 scales [KV, n_ctx]) at positions pos..pos+T-1,
 * as KVCache.write stores them. */
static PyObject *py_kv_store(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *qo, *ko, *vo, *kso, *vso;
    int H, KV, hd, n_ctx, pos, T = 0, stride = 0;
    if (!PyArg_ParseTuple(args, "OiiiOOOOii", &qo, &H, &KV, &hd, &ko, &vo, &kso, &vso, &n_ctx, &pos)) return NULL;
    if (H < 1 || KV < 1 || hd < 1 || n_ctx < 1 || H > 65536 || KV > 65536 || hd > 65536) {
        PyErr_Format(PyExc_ValueError, "heads (%d), kv_heads (%d), head_dim (%d), n_ctx (%d) must be >= 1 "
                     "(heads, kv_heads, head_dim <= 65536)", H, KV, hd, n_ctx);
        return NULL;
    }
    Py_buffer q;
    kv_views c;
    Py_ssize_t q_extent;
    if (get_q_rows(qo, &q, (Py_ssize_t)(H + 2 * KV) * hd, &T, &stride, &q_extent) != 0) return NULL;
    if (pos < 0 || pos > n_ctx - T) {
        PyErr_Format(PyExc_ValueError, "positions %d..%d do not fit the cache of %d", pos, pos + T - 1, n_ctx);
        goto fail_q;
    }
    if (get_kv(ko, vo, kso, vso, KV, n_ctx, hd, 1, &c) != 0) goto fail_q;
    const Py_buffer q_span = {.buf = q.buf, .len = q_extent};
    if (overlaps(&q_span, &c.k) || overlaps(&q_span, &c.v) || overlaps(&c.k, &c.v) ||
        (c.ks.buf && (overlaps(&q_span, &c.ks) || overlaps(&q_span, &c.vs) || overlaps(&c.ks, &c.vs) ||
                      overlaps(&c.ks, &c.k) || overlaps(&c.ks, &c.v) || overlaps(&c.vs, &c.k) ||
                      overlaps(&c.vs, &c.v)))) {
        PyErr_SetString(PyExc_ValueError, "qkv, k, v and the scales must not overlap");
        goto fail_kv;
    }
    const int simd = strcmp(ACTIVE_NAME, "scalar") != 0;
    Py_BEGIN_ALLOW_THREADS
    for (int t = 0; t < T; t++) {
        const float *row = (const float *)q.buf + (size_t)t * stride;
        kv_store_pos(c.kind, simd, c.k.buf, c.v.buf, c.ks.buf, c.vs.buf, KV, n_ctx, hd, pos + t, row + (size_t)H * hd,
                     row + (size_t)(H + KV) * hd);
    }
    Py_END_ALLOW_THREADS
    release_kv(&c);
    PyBuffer_Release(&q);
    Py_RETURN_NONE;
fail_kv:
    release_kv(&c);
fail_q:
    PyBuffer_Release(&q);
    return NULL;
}

/* ---- decode plan: every layer's weights and the KV cache, held for run_forward_rows -------- */

typedef struct {
    decode_plan plan;
    dec_layer *layers;
    Py_buffer *bufs; /* views kept for the plan's lifetime: weights, biases, norms, caches */
    int n_bufs;
} plan_holder;

#define PLAN_CAPSULE "pocketlm.kernel.decode_plan"
#define PLAN_BUFS_PER_LAYER 12 /* 4 norm weights/biases, 4 matrices, 4 biases */

static void plan_free(PyObject *cap) {
    plan_holder *p = PyCapsule_GetPointer(cap, PLAN_CAPSULE);
    if (!p) return;
    for (int i = 0; i < p->n_bufs; i++) PyBuffer_Release(&p->bufs[i]);
    free(p->bufs);
    free(p->layers);
    free(p->plan.scratch);
    free(p);
}

/* An optional float32 vector of n values (None -> NULL); the view goes to p->bufs. */
static int plan_vector(plan_holder *p, PyObject *o, Py_ssize_t n, const char *what, int layer, int required,
                       const float **out) {
    *out = NULL;
    if (o == Py_None) {
        if (!required) return 0;
        PyErr_Format(PyExc_ValueError, "layer %d %s is required", layer, what);
        return -1;
    }
    if (get_f32(o, &p->bufs[p->n_bufs], n, 0, what) != 0) return -1;
    *out = p->bufs[p->n_bufs++].buf;
    return 0;
}

/* One linear (raw, gtype, bias-or-None) of the expected shape into *l. */
static int plan_linear(plan_holder *p, PyObject *spec, int rows, int K, const char *what, int layer,
                       dec_linear *l) {
    PyObject *wo, *bo;
    int gtype, nb;
    if (!PyArg_ParseTuple(spec, "OiO", &wo, &gtype, &bo)) return -1;
    Py_buffer *w = &p->bufs[p->n_bufs];
    if (get_raw(wo, w, what) != 0) return -1;
    p->n_bufs++;
    const gtype_info *t;
    if (check_matrix(gtype, rows, K, w, &t, &nb) != 0) {
        PyErr_Format(PyExc_ValueError, "layer %d %s: expected %d x %d of GGML type %d that the kernel runs", layer,
                     what, rows, K, gtype);
        return -1;
    }
    *l = (dec_linear){w->buf, t, rows, K, NULL};
    return plan_vector(p, bo, rows, what, layer, 0, &l->bias);
}

/* A layer's attention pattern: None (dense) or (block, local_blocks, vert_stride, head_step). */
static int plan_sparse(PyObject *o, int layer, block_sparse *bs) {
    *bs = (block_sparse){0, 0, 0, 0};
    if (o == Py_None) return 0;
    if (!PyArg_ParseTuple(o, "iiii", &bs->block, &bs->local_blocks, &bs->vert_stride, &bs->head_step)) return -1;
    if (bs->block < 1 || bs->local_blocks < 1 || bs->vert_stride < 1 || bs->head_step < 0) {
        PyErr_Format(PyExc_ValueError, "layer %d: bad block-sparse pattern (block %d, local %d, stride %d, step %d)",
                     layer, bs->block, bs->local_blocks, bs->vert_stride, bs->head_step);
        return -1;
    }
    return 0;
}

/* decode_plan(layers, (D, H, KV, hd, F, n_ctx, window, eps, norm, act, act_limit, attn_scale, rot), k_cache,
 * v_cache[, k_scale, v_scale]) -> capsule. layers: sequence of (attn_norm, attn_norm_bias, ffn_norm,
 * ffn_norm_bias, qkv, o, gate_up, down, sparse): norm biases None for RMSNorm (norm 0) and required for
 * LayerNorm (norm 1); each linear (raw, gtype, bias-or-None); sparse None or (block, local_blocks,
 * vert_stride, head_step). act 0 SwiGLU, 1 GeGELU with limit act_limit. Caches [n_layers, KV, n_ctx, hd]
 * fp16, float32 or int8 (then with fp16 scales [n_layers, KV, n_ctx]). */
static PyObject *py_decode_plan(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *lo, *ko, *vo, *kso = Py_None, *vso = Py_None;
    int D, H, KV, hd, F, n_ctx, window, norm, act, rot;
    double eps, act_limit, attn_scale;
    if (!PyArg_ParseTuple(args, "O(iiiiiiidiiddi)OO|OO", &lo, &D, &H, &KV, &hd, &F, &n_ctx, &window, &eps, &norm,
                          &act, &act_limit, &attn_scale, &rot, &ko, &vo, &kso, &vso))
        return NULL;
    if (D < 1 || H < 1 || KV < 1 || hd < 2 || F < 1 || n_ctx < 1 || window < 0 || H > 65536 || hd > 65536 ||
        hd % 2 || rot < 2 || rot % 2 || rot > hd || H % KV || !(eps > 0) || (norm != NORM_RMS && norm != NORM_LAYER) ||
        (act != ACT_SWIGLU && act != ACT_GEGELU) || (act == ACT_GEGELU && !(act_limit > 0)) ||
        !(attn_scale > 0) || !isfinite(attn_scale)) {
        char msg[320]; /* PyErr_Format has no %g */
        snprintf(msg, sizeof msg, "bad model dimensions: hidden %d, heads %d, kv_heads %d, head_dim %d (even), "
                 "ffn %d, n_ctx %d, window %d, eps %g, norm %d, activation %d (limit %g), attention scale %g, "
                 "rotary %d (even, <= head_dim)", D, H, KV, hd, F, n_ctx, window, eps, norm, act, act_limit, attn_scale,
                 rot);
        PyErr_SetString(PyExc_ValueError, msg);
        return NULL;
    }
    PyObject *seq = PySequence_Fast(lo, "layers must be a sequence");
    if (!seq) return NULL;
    const Py_ssize_t n_layers = PySequence_Fast_GET_SIZE(seq);
    plan_holder *p = calloc(1, sizeof(*p));
    PyObject *cap = NULL;
    if (!p || n_layers < 1 || n_layers > 100000) {
        if (p) PyErr_Format(PyExc_ValueError, "a model needs 1..100000 layers, got %zd", n_layers);
        else PyErr_NoMemory();
        free(p);
        Py_DECREF(seq);
        return NULL;
    }
    p->layers = calloc((size_t)n_layers, sizeof(dec_layer));
    p->bufs = calloc((size_t)n_layers * PLAN_BUFS_PER_LAYER + 4, sizeof(Py_buffer));
    decode_plan *pl = &p->plan;
    *pl = (decode_plan){.n_layers = (int)n_layers, .D = D, .H = H, .KV = KV, .hd = hd, .F = F, .n_ctx = n_ctx,
                        .window = window, .rot = rot, .norm = norm, .act = act, .eps = (float)eps,
                        .act_limit = (float)act_limit, .attn_scale = (float)attn_scale, .layers = p->layers};
    pl->scratch = malloc(sizeof(float) * decode_scratch_floats(pl));
    cap = PyCapsule_New(p, PLAN_CAPSULE, plan_free); /* from here on plan_free cleans up */
    if (!cap) {
        free(pl->scratch);
        free(p->layers);
        free(p->bufs);
        free(p);
        Py_DECREF(seq);
        return NULL;
    }
    if (!p->layers || !p->bufs || !pl->scratch) {
        PyErr_NoMemory();
        goto fail;
    }
    const Py_ssize_t n_cache = (Py_ssize_t)n_layers * KV * n_ctx * hd;
    int kk, vk;
    if (get_cache(ko, &p->bufs[p->n_bufs], n_cache, 1, &kk, "k_cache") != 0) goto fail;
    pl->k_cache = p->bufs[p->n_bufs++].buf;
    if (get_cache(vo, &p->bufs[p->n_bufs], n_cache, 1, &vk, "v_cache") != 0) goto fail;
    pl->v_cache = p->bufs[p->n_bufs++].buf;
    if (kk != vk) {
        PyErr_SetString(PyExc_TypeError, "k_cache and v_cache must have the same dtype");
        goto fail;
    }
    pl->kv_kind = kk;
    if ((kk == KV_I8) != (kso != Py_None) || (kso == Py_None) != (vso == Py_None)) {
        PyErr_SetString(PyExc_ValueError, "k_scale and v_scale go with (and only with) an int8 cache");
        goto fail;
    }
    if (kk == KV_I8) {
        const Py_ssize_t n_scales = (Py_ssize_t)n_layers * KV * n_ctx;
        int sk;
        if (get_cache(kso, &p->bufs[p->n_bufs], n_scales, 0, &sk, "k_scale") != 0) goto fail;
        pl->k_scale = p->bufs[p->n_bufs++].buf;
        if (sk != KV_F16) {
            PyErr_SetString(PyExc_TypeError, "k_scale must be float16");
            goto fail;
        }
        if (get_cache(vso, &p->bufs[p->n_bufs], n_scales, 0, &sk, "v_scale") != 0) goto fail;
        pl->v_scale = p->bufs[p->n_bufs++].buf;
        if (sk != KV_F16) {
            PyErr_SetString(PyExc_TypeError, "v_scale must be float16");
            goto fail;
        }
    }
    const int layer_norm = norm == NORM_LAYER;
    for (Py_ssize_t i = 0; i < n_layers; i++) {
        PyObject *an, *anb, *fn, *fnb, *qkv, *o, *gu, *down, *sp;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "OOOOOOOOO", &an, &anb, &fn, &fnb, &qkv, &o, &gu,
                              &down, &sp))
            goto fail;
        dec_layer *L = &p->layers[i];
        if (plan_vector(p, an, D, "attn_norm", (int)i, 1, &L->attn_norm) ||
            plan_vector(p, anb, D, "attn_norm bias", (int)i, layer_norm, &L->attn_norm_b) ||
            plan_vector(p, fn, D, "ffn_norm", (int)i, 1, &L->ffn_norm) ||
            plan_vector(p, fnb, D, "ffn_norm bias", (int)i, layer_norm, &L->ffn_norm_b))
            goto fail;
        if (!layer_norm && (L->attn_norm_b || L->ffn_norm_b)) {
            PyErr_Format(PyExc_ValueError, "layer %zd: RMSNorm has no bias", i);
            goto fail;
        }
        if (plan_linear(p, qkv, (H + 2 * KV) * hd, D, "qkv", (int)i, &L->qkv) ||
            plan_linear(p, o, D, H * hd, "o", (int)i, &L->o) ||
            plan_linear(p, gu, 2 * F, D, "gate_up", (int)i, &L->gate_up) ||
            plan_linear(p, down, D, F, "down", (int)i, &L->down) || plan_sparse(sp, (int)i, &L->sparse))
            goto fail;
    }
    Py_DECREF(seq);
    return cap;
fail:
    Py_DECREF(seq);
    Py_DECREF(cap);
    return NULL;
}

/* A 2-D C-contiguous float32 array: its buffer and shape. */
static int get_f32_2d(PyObject *o, Py_buffer *v, int writable, const char *what, int *rows, int *cols) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_ND | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(o, v, flags) != 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s must be a C-contiguous%s float32 array (got %s)", what,
                     writable ? " writable" : "", Py_TYPE(o)->tp_name);
        return -1;
    }
    if (buf_kind(v) != 'f' || v->itemsize != 4 || v->ndim != 2 || v->shape[0] < 1 || v->shape[1] < 1 ||
        v->shape[0] > INT_MAX || v->shape[1] > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "%s must be a non-empty 2-D float32 array", what);
        PyBuffer_Release(v);
        return -1;
    }
    *rows = (int)v->shape[0];
    *cols = (int)v->shape[1];
    return 0;
}

/* decode_step(plan, h [D], cos [rot/2], sin [rot/2], pos): one token through every layer;
 * forward_rows(plan, h [T, D], cos [T, rot/2], sin [T, rot/2], pos): T tokens (positions pos..). */
static PyObject *plan_forward(PyObject *args, int rows) {
    PyObject *po, *ho, *co, *so;
    int pos, rc = 0, T = 1, D;
    if (!PyArg_ParseTuple(args, "OOOOi", &po, &ho, &co, &so, &pos)) return NULL;
    if (!PyCapsule_IsValid(po, PLAN_CAPSULE)) {
        PyErr_SetString(PyExc_TypeError, "plan must be built by decode_plan");
        return NULL;
    }
    const decode_plan *pl = &((plan_holder *)PyCapsule_GetPointer(po, PLAN_CAPSULE))->plan;
    Py_buffer h, c, s;
    if (rows ? get_f32_2d(ho, &h, 1, "h", &T, &D) : get_f32(ho, &h, pl->D, 1, "h")) return NULL;
    if (rows && D != pl->D) {
        PyErr_Format(PyExc_ValueError, "h must be [T, %d] (got [%d, %d])", pl->D, T, D);
        goto fail_h;
    }
    if (pos < 0 || pos > pl->n_ctx - T) {
        PyErr_Format(PyExc_ValueError, "positions %d..%d are outside the cache's %d positions", pos, pos + T - 1,
                     pl->n_ctx);
        goto fail_h;
    }
    if (get_f32(co, &c, (Py_ssize_t)T * (pl->rot / 2), 0, "cos") != 0) goto fail_h;
    if (get_f32(so, &s, (Py_ssize_t)T * (pl->rot / 2), 0, "sin") != 0) goto fail_c;
    if (check_finite(h.buf, (size_t)T * pl->D, "h") != 0) goto fail_s;
    const dot_fn *table = ACTIVE_TABLE;
    const int simd = strcmp(ACTIVE_NAME, "scalar") != 0;
    Py_BEGIN_ALLOW_THREADS
    rc = run_forward_rows(table, simd, pl, h.buf, T, c.buf, s.buf, pos);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        PyErr_NoMemory();
        goto fail_s;
    }
    if (check_finite(h.buf, (size_t)T * pl->D, "the hidden state after the layers") != 0) goto fail_s;
    PyBuffer_Release(&s);
    PyBuffer_Release(&c);
    PyBuffer_Release(&h);
    Py_RETURN_NONE;
fail_s:
    PyBuffer_Release(&s);
fail_c:
    PyBuffer_Release(&c);
fail_h:
    PyBuffer_Release(&h);
    return NULL;
}

static PyObject *py_decode_step(PyObject *self, PyObject *args) {
    (void)self;
    return plan_forward(args, 0);
}

static PyObject *py_forward_rows(PyObject *self, PyObject *args) {
    (void)self;
    return plan_forward(args, 1);
}

/* ---- prefill's element-wise steps ---------------------------------------------------------- */

/* norm(h [T, D], w [D], b [D] or None, eps, out [T, D]): RMSNorm without a bias, LayerNorm with one. */
static PyObject *py_norm(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *ho, *wo, *bo, *oo;
    double eps;
    if (!PyArg_ParseTuple(args, "OOOdO", &ho, &wo, &bo, &eps, &oo)) return NULL;
    Py_buffer h, w, b = {0}, o;
    int T, D, T2, D2;
    if (get_f32_2d(ho, &h, 0, "h", &T, &D) != 0) return NULL;
    if (get_f32(wo, &w, D, 0, "w") != 0) goto fail_h;
    if (bo != Py_None && get_f32(bo, &b, D, 0, "b") != 0) goto fail_w;
    if (get_f32_2d(oo, &o, 1, "out", &T2, &D2) != 0) goto fail_b;
    if (T2 != T || D2 != D || !(eps > 0)) {
        PyErr_Format(PyExc_ValueError, "out must have h's shape (%d, %d) and eps be > 0", T, D);
        goto fail_o;
    }
    const int kind = bo == Py_None ? NORM_RMS : NORM_LAYER;
    Py_BEGIN_ALLOW_THREADS
    run_norm_rows(kind, h.buf, w.buf, b.buf, T, D, (float)eps, o.buf);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&o);
    if (b.obj) PyBuffer_Release(&b);
    PyBuffer_Release(&w);
    PyBuffer_Release(&h);
    Py_RETURN_NONE;
fail_o:
    PyBuffer_Release(&o);
fail_b:
    if (b.obj) PyBuffer_Release(&b);
fail_w:
    PyBuffer_Release(&w);
fail_h:
    PyBuffer_Release(&h);
    return NULL;
}

/* rope(x [T, width], n_heads, hd, rot, cos [T, rot/2], sin [T, rot/2]): the first rot values of each of
 * the first n_heads heads of hd columns. */
static PyObject *py_rope(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *xo, *co, *so;
    int n_heads, hd, rot;
    if (!PyArg_ParseTuple(args, "OiiiOO", &xo, &n_heads, &hd, &rot, &co, &so)) return NULL;
    Py_buffer x, c, s;
    int T, width;
    if (get_f32_2d(xo, &x, 1, "x", &T, &width) != 0) return NULL;
    if (n_heads < 1 || hd < 2 || hd % 2 || rot < 2 || rot % 2 || rot > hd || (int64_t)n_heads * hd > width) {
        PyErr_Format(PyExc_ValueError, "%d heads of %d (even) values, rotary %d (even, <= head), do not fit rows of %d",
                     n_heads, hd, rot, width);
        PyBuffer_Release(&x);
        return NULL;
    }
    if (get_f32(co, &c, (Py_ssize_t)T * (rot / 2), 0, "cos") != 0) goto fail_x;
    if (get_f32(so, &s, (Py_ssize_t)T * (rot / 2), 0, "sin") != 0) goto fail_c;
    Py_BEGIN_ALLOW_THREADS
    run_rope_rows(x.buf, T, width, n_heads, hd, rot, c.buf, s.buf);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&s);
    PyBuffer_Release(&c);
    PyBuffer_Release(&x);
    Py_RETURN_NONE;
fail_c:
    PyBuffer_Release(&c);
fail_x:
    PyBuffer_Release(&x);
    return NULL;
}

/* gated_act(gu [T, 2F], kind, limit, out [T, F]): kind 0 SwiGLU, 1 GeGELU with `limit`. */
static PyObject *py_gated_act(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *go, *oo;
    int kind;
    double limit;
    if (!PyArg_ParseTuple(args, "OidO", &go, &kind, &limit, &oo)) return NULL;
    if ((kind != ACT_SWIGLU && kind != ACT_GEGELU) || (kind == ACT_GEGELU && !(limit > 0))) {
        char msg[160]; /* PyErr_Format has no %g */
        snprintf(msg, sizeof msg, "activation kind %d with limit %g: expected 0 (SwiGLU) or 1 (GeGELU, limit > 0)",
                 kind, limit);
        PyErr_SetString(PyExc_ValueError, msg);
        return NULL;
    }
    Py_buffer g, o;
    int T, F2, T2, F;
    if (get_f32_2d(go, &g, 0, "gu", &T, &F2) != 0) return NULL;
    if (get_f32_2d(oo, &o, 1, "out", &T2, &F) != 0) {
        PyBuffer_Release(&g);
        return NULL;
    }
    if (T2 != T || (int64_t)F * 2 != F2) {
        PyErr_Format(PyExc_ValueError, "out must be (%d, %d) for gu of shape (%d, %d)", T, F2 / 2, T, F2);
    } else {
        Py_BEGIN_ALLOW_THREADS
        run_gated_act_rows(kind, g.buf, T, F, (float)limit, o.buf);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&o);
    PyBuffer_Release(&g);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}

/* Index of the first block with a NaN/inf scale field, or -1. */
static PyObject *py_check_blocks(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *wo;
    int gtype;
    if (!PyArg_ParseTuple(args, "Oi", &wo, &gtype)) return NULL;
    const gtype_info *t = kernel_type_info(gtype);
    if (!t) {
        PyErr_Format(PyExc_ValueError, "GGML type %d is not supported by the kernel", gtype);
        return NULL;
    }
    Py_buffer w;
    if (get_raw(wo, &w, "weights") != 0) return NULL;
    if (w.len % t->block_bytes != 0) {
        PyErr_Format(PyExc_ValueError, "weight buffer of %zd bytes is not a whole number of %d-byte blocks",
                     w.len, t->block_bytes);
        PyBuffer_Release(&w);
        return NULL;
    }
    const Py_ssize_t n = w.len / t->block_bytes;
    Py_ssize_t bad = -1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++)
        if (block_is_bad(t, (const uint8_t *)w.buf + i * t->block_bytes)) {
            bad = i;
            break;
        }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&w);
    return PyLong_FromSsize_t(bad);
}

/* Q4_0 / Q8_0 / Q4_K raw rows -> their packed layout (kernel.h) in a caller-allocated buffer of
 * the same size. */
static PyObject *py_repack(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *wo, *oo;
    int gtype, rows, K, nb;
    if (!PyArg_ParseTuple(args, "OiiiO", &wo, &gtype, &rows, &K, &oo)) return NULL;
    if (!packed_type_of(gtype)) {
        PyErr_Format(PyExc_ValueError, "only Q4_0 (2), Q8_0 (8) and Q4_K (12) can be repacked, not type %d", gtype);
        return NULL;
    }
    if (K % PACK_VALUES != 0) {
        PyErr_Format(PyExc_ValueError, "K=%d: repacking needs K to be a multiple of %d", K, PACK_VALUES);
        return NULL;
    }
    Py_buffer w, o;
    const gtype_info *t;
    if (get_raw(wo, &w, "weights") != 0) return NULL;
    if (check_matrix(gtype, rows, K, &w, &t, &nb) != 0) {
        PyBuffer_Release(&w);
        return NULL;
    }
    if (PyObject_GetBuffer(oo, &o, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) != 0) {
        PyErr_Clear();
        PyErr_SetString(PyExc_TypeError, "out must be a writable C-contiguous buffer");
        PyBuffer_Release(&w);
        return NULL;
    }
    if (o.len != w.len) {
        PyErr_Format(PyExc_ValueError, "out has %zd bytes, expected %zd", o.len, w.len);
    } else {
        Py_BEGIN_ALLOW_THREADS
        repack_groups(gtype, w.buf, o.buf, (size_t)rows * (K / PACK_VALUES));
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&o);
    PyBuffer_Release(&w);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}

/* 1 if the active path runs the type with a SIMD kernel (not the scalar fallback). */
static PyObject *py_native_kernel(PyObject *self, PyObject *args) {
    (void)self;
    int gtype;
    if (!PyArg_ParseTuple(args, "i", &gtype)) return NULL;
    const gtype_info *t = kernel_type_info(gtype);
    if (!t) {
        PyErr_Format(PyExc_ValueError, "GGML type %d is not supported by the kernel", gtype);
        return NULL;
    }
    /* own or inherited from a faster path: anything but the portable C */
    return PyBool_FromLong(strcmp(ACTIVE_NAME, "scalar") == 0 || ACTIVE_TABLE[t->slot] != path_scalar.dot[t->slot]);
}

/* ---- configuration ------------------------------------------------------------------------- */

static PyObject *py_set_path(PyObject *self, PyObject *args) {
    (void)self;
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    const dot_fn *t = path_table(name);
    if (!t) {
        PyErr_Format(PyExc_ValueError, "kernel path '%s' is not available on this CPU/build (available: %s)",
                     name, available_paths_string());
        return NULL;
    }
    ACTIVE_TABLE = t;
    ACTIVE_TABLE2 = path_table2x2(name);
    ACTIVE_GEMM = path_gemm(name);
    ACTIVE_NAME = path_static_name(name); /* `name` dies with its Python string */
    Py_RETURN_NONE;
}

static PyObject *py_active_path(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    return PyUnicode_FromString(ACTIVE_NAME);
}

static PyObject *py_set_threads(PyObject *self, PyObject *args) {
    (void)self;
    int n;
    if (!PyArg_ParseTuple(args, "i", &n)) return NULL;
    if (n < 1 || n > 1024) {
        PyErr_Format(PyExc_ValueError, "thread count %d must be between 1 and 1024", n);
        return NULL;
    }
    if (pool_set_threads(n) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "could not configure the thread pool");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *py_get_threads(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    return PyLong_FromLong(pool_threads());
}

static PyObject *py_cpu_features(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    return PyUnicode_FromString(cpu_features_string());
}

static PyObject *py_available_paths(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    return PyUnicode_FromString(available_paths_string());
}

static PyObject *py_type_info(PyObject *self, PyObject *args) {
    (void)self;
    int gtype;
    if (!PyArg_ParseTuple(args, "i", &gtype)) return NULL;
    const gtype_info *t = kernel_type_info(gtype);
    if (!t) {
        PyErr_Format(PyExc_ValueError, "GGML type %d is not supported by the kernel", gtype);
        return NULL;
    }
    return Py_BuildValue("ii", t->block_values, t->block_bytes);
}

static PyMethodDef METHODS[] = {
    {"matvec", py_matvec, METH_VARARGS, "matvec(w, gtype, rows, K, x, out): out[rows] = W.x"},
    {"matmul", py_matmul, METH_VARARGS, "matmul(w, gtype, rows, K, X, M, out): out[M, rows] = X.W^T"},
    {"attention", py_attention, METH_VARARGS,
     "attention(q, k, v, H, KV, hd, n_ctx, lo, hi, out): decode attention of one token over a KV cache"},
    {"attention_rows", py_attention_rows, METH_VARARGS,
     "attention_rows(q, k, v, k_scale, v_scale, H, KV, hd, n_ctx, pos, window, scale, sparse, out): attention "
     "of T query rows (dense, window, block-sparse) over a KV cache"},
    {"kv_store", py_kv_store, METH_VARARGS,
     "kv_store(qkv, H, KV, hd, k, v, k_scale, v_scale, n_ctx, pos): the k and v of T fused qkv rows into a "
     "layer's cache at pos.."},
    {"check_blocks", py_check_blocks, METH_VARARGS, "index of the first block with a NaN/inf scale, or -1"},
    {"set_path", py_set_path, METH_VARARGS, "select a code path by name"},
    {"active_path", py_active_path, METH_NOARGS, "name of the code path in use"},
    {"available_paths", py_available_paths, METH_NOARGS, "space-separated usable code paths"},
    {"cpu_features", py_cpu_features, METH_NOARGS, "space-separated CPU features the kernel uses"},
    {"set_threads", py_set_threads, METH_VARARGS, "set the worker thread count (>= 1)"},
    {"get_threads", py_get_threads, METH_NOARGS, "the worker thread count"},
    {"decode_plan", py_decode_plan, METH_VARARGS,
     "decode_plan(layers, dims, k_cache, v_cache[, k_scale, v_scale]): a decode-step plan"},
    {"decode_step", py_decode_step, METH_VARARGS, "decode_step(plan, h, cos, sin, pos): one token through every layer"},
    {"forward_rows", py_forward_rows, METH_VARARGS,
     "forward_rows(plan, h, cos, sin, pos): T rows h [T, D] through every layer (positions pos..pos+T-1)"},
    {"norm", py_norm, METH_VARARGS, "norm(h, w, b, eps, out): RMSNorm (b None) or LayerNorm of each row"},
    {"rope", py_rope, METH_VARARGS, "rope(x, n_heads, hd, cos, sin): NEOX RoPE in place on each row"},
    {"gated_act", py_gated_act, METH_VARARGS, "gated_act(gu, kind, limit, out): SwiGLU (0) or GeGELU (1) of each row"},
    {"repack", py_repack, METH_VARARGS, "repack(w, gtype, rows, K, out): Q4_0 / Q8_0 / Q4_K -> packed layout (1002 / 1008 / 1012)"},
    {"native_kernel", py_native_kernel, METH_VARARGS, "True if the active path has its own kernel for a type"},
    {"type_info", py_type_info, METH_VARARGS, "(block_values, block_bytes) of a GGML type"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_kernel", "pocketlm quantized matmul kernel",
                                    -1, METHODS, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernel(void) {
    ACTIVE_NAME = best_path_name();
    ACTIVE_TABLE = path_table(ACTIVE_NAME);
    ACTIVE_TABLE2 = path_table2x2(ACTIVE_NAME);
    ACTIVE_GEMM = path_gemm(ACTIVE_NAME);
    return PyModule_Create(&MODULE);
}
