/* One ISA's kernel table: included once by each kernels/ops_<isa>.c after it has defined its
 * RV_ISA_* (and RV_HAVE_VNNI) macros, which every template below is compiled under with that
 * file's flags (see setup.py); RV_OPS_TABLE(name) then defines rv_fill_ops_<isa>. */
#ifndef RV_OPS_TABLE_H
#define RV_OPS_TABLE_H

#include "kernels/basic_impl.h"
#include "kernels/attention_impl.h"
#include "kernels/quant_impl.h"
#include "kernels/qmatmul_impl.h"

#define RV_OPS_TABLE(name)                 \
    void rv_fill_ops_##name(rv_ops *ops)   \
    {                                      \
        ops->isa = #name;                  \
        ops->lanes = RV_VW;                \
        fill_basic_ops(ops);               \
        fill_attention_ops(ops);           \
        fill_quant_ops(ops);               \
        fill_qmatmul_ops(ops);             \
    }

#endif
