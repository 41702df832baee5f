/* The pod sandbox's pause process (containerd's sandbox_image) for the test node: it holds the
 * pod's namespaces and reaps nothing but its own end.  Built static by scripts/images.sh, so
 * its image is this one file; no registry is needed for the upstream one. */
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }

int main(void) {
    signal(SIGINT, stop);
    signal(SIGTERM, stop);
    for (;;)
        pause();
}
