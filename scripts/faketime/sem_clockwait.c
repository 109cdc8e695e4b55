/* Timed waits on a faked monotonic clock, for scripts/on_date.sh.
 *
 * libfaketime (Debian's 0.9.10) shifts CLOCK_MONOTONIC by the offset as well, and translates the
 * timed waits it knows (nanosleep, clock_nanosleep, sem_timedwait, pthread_cond_timedwait) back to
 * the kernel's clock, but not sem_clockwait, which Python (3.11+, glibc 2.30+) uses for every lock
 * acquired with a timeout (threading.Event.wait, queue.get): the deadline, computed on the shifted
 * clock, lies the offset ahead of the kernel's, and the thread sleeps that long (the Dagster
 * daemon's loops stop). FAKETIME_DONT_FAKE_MONOTONIC=1 instead breaks time.sleep (EINVAL). This
 * wrapper turns a CLOCK_MONOTONIC deadline into the same remaining time on the kernel's clock. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <semaphore.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define NS 1000000000LL

int sem_clockwait(sem_t *sem, clockid_t clock, const struct timespec *deadline) {
    static int (*next)(sem_t *, clockid_t, const struct timespec *);
    if (!next)
        next = (int (*)(sem_t *, clockid_t, const struct timespec *))dlsym(RTLD_NEXT, "sem_clockwait");
    if (clock != CLOCK_MONOTONIC)
        return next(sem, clock, deadline);
    struct timespec shifted, kernel, real_deadline;
    clock_gettime(CLOCK_MONOTONIC, &shifted);                 /* libfaketime's: the deadline's clock */
    syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &kernel);     /* the kernel's own */
    long long left = (deadline->tv_sec - shifted.tv_sec) * NS + (deadline->tv_nsec - shifted.tv_nsec);
    long long at = kernel.tv_nsec + (left > 0 ? left : 0);
    real_deadline.tv_sec = kernel.tv_sec + at / NS;
    real_deadline.tv_nsec = at % NS;
    return next(sem, CLOCK_MONOTONIC, &real_deadline);
}
