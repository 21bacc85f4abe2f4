/* Makes every wildcard listen of a process bind IPv4 loopback only.
 *
 * TensorFlow 2.21's gRPC server listens on [::]:port (or 0.0.0.0:port)
 * whatever the cluster spec says, and has no option to change it. Loaded
 * with LD_PRELOAD into the tasks of a local cluster, this bind() rewrites
 * 0.0.0.0 to 127.0.0.1 and refuses [::] (gRPC then falls back to 0.0.0.0,
 * which becomes 127.0.0.1), so no other host can reach the servers.
 * Explicit addresses pass through unchanged. Built by gba_tf/launch/loopback.py.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
  static int (*real_bind)(int, const struct sockaddr *, socklen_t);
  if (!real_bind) real_bind = dlsym(RTLD_NEXT, "bind");
  if (addr && addr->sa_family == AF_INET &&
      len >= (socklen_t)sizeof(struct sockaddr_in)) {
    struct sockaddr_in a;
    memcpy(&a, addr, sizeof a);
    if (a.sin_addr.s_addr == htonl(INADDR_ANY)) {
      a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      return real_bind(fd, (const struct sockaddr *)&a, sizeof a);
    }
  } else if (addr && addr->sa_family == AF_INET6 &&
             len >= (socklen_t)sizeof(struct sockaddr_in6)) {
    struct sockaddr_in6 a;
    memcpy(&a, addr, sizeof a);
    if (!memcmp(&a.sin6_addr, &in6addr_any, sizeof a.sin6_addr)) {
      errno = EAFNOSUPPORT;
      return -1;
    }
  }
  return real_bind(fd, addr, len);
}
