// Convolution forward through oneDNN's training kernels (CPU); compiled by jt.code (ccnet/ops/conv.py).

#include <dnnl.hpp>

namespace ccnet_conv {
// y = conv(x, w): x (n, c, h, w), w (oc, c, kh, kw), y (n, oc, oh, ow), all plain NCHW / OIHW float32;
// p = stride, padding, dilation (h, w each). oneDNN chooses its own blocked layouts; inputs are reordered into
// them and the output back.
inline void forward(const float* x, const float* w, const int* p, float* y, int n, int c, int h, int wd, int oc,
                    int kh, int kw, int oh, int ow) {
    const int sh = p[0], sw = p[1], ph = p[2], pw = p[3], dh = p[4], dw = p[5];
    using namespace dnnl;
    using tag = memory::format_tag;
    const auto f32 = memory::data_type::f32;
    static engine eng(engine::kind::cpu, 0);
    stream s(eng);
    memory::dims src_dims{n, c, h, wd}, wei_dims{oc, c, kh, kw}, dst_dims{n, oc, oh, ow};
    auto desc = convolution_forward::desc(
        prop_kind::forward_training, algorithm::convolution_direct, memory::desc(src_dims, f32, tag::any),
        memory::desc(wei_dims, f32, tag::any), memory::desc(dst_dims, f32, tag::any), {sh, sw},
        {dh - 1, dw - 1}, {ph, pw}, {ph, pw});  // oneDNN counts dilation from 0
    auto pd = convolution_forward::primitive_desc(desc, eng);
    memory user_src({src_dims, f32, tag::nchw}, eng, const_cast<float*>(x));
    memory user_wei({wei_dims, f32, tag::oihw}, eng, const_cast<float*>(w));
    memory user_dst({dst_dims, f32, tag::nchw}, eng, y);
    auto src = user_src, wei = user_wei, dst = user_dst;
    if (pd.src_desc() != user_src.get_desc()) {
        src = memory(pd.src_desc(), eng);
        reorder(user_src, src).execute(s, user_src, src);
    }
    if (pd.weights_desc() != user_wei.get_desc()) {
        wei = memory(pd.weights_desc(), eng);
        reorder(user_wei, wei).execute(s, user_wei, wei);
    }
    if (pd.dst_desc() != user_dst.get_desc())
        dst = memory(pd.dst_desc(), eng);
    convolution_forward(pd).execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}});
    if (dst != user_dst)
        reorder(dst, user_dst).execute(s, dst, user_dst);
    s.wait();
}
}  // namespace ccnet_conv
