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


cdef inline int effective_n_threads(int requested) noexcept nogil:
    """Threads a parallel region should use: `requested` if > 0 (capped at the OpenMP
    maximum), else the OpenMP maximum (OMP_NUM_THREADS or the core count); 1 without OpenMP."""
    cdef int max_threads = omp_get_max_threads()
    if not RV_OPENMP_ENABLED:
        return 1
    if requested <= 0 or requested > max_threads:
        return max_threads
    return requested
