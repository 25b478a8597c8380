/* The scalar kernel table: every kernel template compiled with this ISA's flags (see setup.py). */
#define RV_ISA_SCALAR 1
#include "kernels/basic_impl.h"
#include "kernels/attention_impl.h"
#include "kernels/quant_impl.h"
#include "kernels/qmatmul_impl.h"

void rv_fill_ops_scalar(rv_ops *ops)
{
    ops->isa = RV_ISA_NAME;
    ops->lanes = RV_VW;
    fill_basic_ops(ops);
    fill_attention_ops(ops);
    fill_quant_ops(ops);
    fill_qmatmul_ops(ops);
}
