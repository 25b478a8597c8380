/* The avx512vnni kernel table: the avx512 templates again, compiled with VNNI (see setup.py),
 * so the quantized matmuls take VPDPBUSD; chosen at import when cpuid reports AVX512_VNNI. */
#define RV_ISA_AVX512 1
#define RV_HAVE_VNNI 1
#include "kernels/basic_impl.h"
#include "kernels/attention_impl.h"
#include "kernels/quant_impl.h"
#include "kernels/qmatmul_impl.h"

void rv_fill_ops_avx512vnni(rv_ops *ops)
{
    ops->isa = "avx512vnni";
    ops->lanes = RV_VW;
    fill_basic_ops(ops);
    fill_attention_ops(ops);
    fill_quant_ops(ops);
    fill_qmatmul_ops(ops);
}
