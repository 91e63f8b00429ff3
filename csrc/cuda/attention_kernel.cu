// CUDA binding of relattn (CUDA dispatch key). The fused tensor-core kernels land with the CUDA
// forward issue; until then the CUDA key reports clearly that these ops have no CUDA kernels yet.
#include <torch/library.h>

#include "../attention.h"

namespace relattn {
namespace ops {
namespace {

ForwardResult attention_forward_cuda(const Tensor& q, const Tensor&, const Tensor&, const OptTensor&,
                                     const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                     const OptTensor&, const OptTensor&, bool, std::optional<double>, int64_t) {
  TORCH_CHECK_NOT_IMPLEMENTED(false, "relattn.attention: the CUDA kernels are not implemented yet (tensor on ",
                              q.device(), "); move the inputs to the CPU");
}

BackwardResult attention_backward_cuda(const Tensor&, const OptTensor&, const Tensor& q, const Tensor&,
                                       const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                       const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                       const OptTensor&, const OptTensor&, bool, std::optional<double>, int64_t) {
  TORCH_CHECK_NOT_IMPLEMENTED(false, "relattn.attention: the CUDA backward is not implemented yet (tensor on ",
                              q.device(), ")");
}

}  // namespace
}  // namespace ops

TORCH_LIBRARY_IMPL(relattn, CUDA, m) {
  m.impl("attention_forward", &ops::attention_forward_cuda);
  m.impl("attention_backward", &ops::attention_backward_cuda);
}

}  // namespace relattn
