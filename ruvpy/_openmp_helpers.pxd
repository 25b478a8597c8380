# OpenMP through one place: without OpenMP these are serial no-ops, so callers never #ifdef.
cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define RV_OPENMP_ENABLED 1
    #else
    #define RV_OPENMP_ENABLED 0
    static inline int omp_get_max_threads(void) { return 1; }
    static inline int omp_get_thread_num(void) { return 0; }
    static inline int omp_get_num_threads(void) { return 1; }
    #endif
    """
    bint RV_OPENMP_ENABLED
    int omp_get_max_threads() noexcept nogil
    int omp_get_thread_num() noexcept nogil
    int omp_get_num_threads() noexcept nogil


# Starting a team (csrc/rv_threads.h): rv_team_start(T) before a region of T threads gives
# RV_ETHREAD instead of libgomp exiting the process when T's workers cannot be started. Each
# extension binds its rv_team_check to ruvpy._kernels.team_check at import (one record per
# process); without OpenMP all of it is a no-op returning RV_OK.
cdef extern from "rv_threads.h" nogil:
    ctypedef int (*rv_team_check_fn)(int nthreads) noexcept nogil
    ctypedef struct rv_team_state:
        int pool_workers
        int threads
        int missing
        int err
    void rv_team_bind(rv_team_check_fn check)
    int rv_team_start(int nthreads)
    int rv_team_check_here(int nthreads)
    int rv_team_precheck_here(int nthreads)
    rv_team_state *rv_team_here()


cdef inline int effective_n_threads(int requested) noexcept nogil:
    """Threads a parallel region should use: `requested` if > 0 (capped at the OpenMP
    maximum), else the OpenMP maximum (OMP_NUM_THREADS or the core count); 1 without OpenMP."""
    cdef int max_threads = omp_get_max_threads()
    if not RV_OPENMP_ENABLED:
        return 1
    if requested <= 0 or requested > max_threads:
        return max_threads
    return requested
