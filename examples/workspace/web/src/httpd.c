/* A tiny static-file HTTP/1.0 server for the example image.
 * Usage: httpd [PORT [ROOT]]  (defaults: 8080 /srv/www). GET and HEAD only. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *content_type(const char *path) {
    const char *dot = strrchr(path, '.');
    if (!dot) return "application/octet-stream";
    if (!strcmp(dot, ".html")) return "text/html; charset=utf-8";
    if (!strcmp(dot, ".css")) return "text/css";
    if (!strcmp(dot, ".txt")) return "text/plain; charset=utf-8";
    return "application/octet-stream";
}

static void reply(int fd, const char *status, const char *type, long length) {
    char head[512];
    int n = snprintf(head, sizeof head,
                     "HTTP/1.0 %s\r\nServer: dtbuild-example\r\nContent-Type: %s\r\n"
                     "Content-Length: %ld\r\nConnection: close\r\n\r\n", status, type, length);
    if (write(fd, head, (size_t)n) < 0) return;
}

static void serve(int fd, const char *root) {
    char req[2048] = {0};
    ssize_t got = read(fd, req, sizeof req - 1);
    if (got <= 0) return;
    char method[8], target[1024];
    if (sscanf(req, "%7s %1023s", method, target) != 2) { reply(fd, "400 Bad Request", "text/plain", 0); return; }
    int head_only = !strcmp(method, "HEAD");
    if (strcmp(method, "GET") && !head_only) { reply(fd, "405 Method Not Allowed", "text/plain", 0); return; }
    if (strstr(target, "..")) { reply(fd, "403 Forbidden", "text/plain", 0); return; }
    char *query = strchr(target, '?');
    if (query) *query = 0;
    char path[2048];
    snprintf(path, sizeof path, "%s%s%s", root, target,
             target[strlen(target) - 1] == '/' ? "index.html" : "");
    int file = open(path, O_RDONLY);
    struct stat st;
    if (file < 0 || fstat(file, &st) < 0 || !S_ISREG(st.st_mode)) {
        const char *body = "not found\n";
        reply(fd, "404 Not Found", "text/plain", (long)strlen(body));
        if (!head_only && write(fd, body, strlen(body)) < 0) {}
        if (file >= 0) close(file);
        return;
    }
    reply(fd, "200 OK", content_type(path), (long)st.st_size);
    char buf[65536];
    ssize_t n;
    while (!head_only && (n = read(file, buf, sizeof buf)) > 0)
        if (write(fd, buf, (size_t)n) < 0) break;
    close(file);
}

/* As PID 1 of a container a signal without a handler does nothing: stop on Ctrl-C and TERM. */
static void stop(int sig) {
    (void)sig;
    _exit(0);
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 8080;
    const char *root = argc > 2 ? argv[2] : "/srv/www";
    signal(SIGPIPE, SIG_IGN);
    signal(SIGINT, stop);
    signal(SIGTERM, stop);
    int server = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(server, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port),
                               .sin_addr.s_addr = htonl(INADDR_ANY)};
    if (bind(server, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(server, 16) < 0) {
        fprintf(stderr, "httpd: cannot listen on port %d: %s\n", port, strerror(errno));
        return 1;
    }
    fprintf(stderr, "httpd: serving %s on port %d\n", root, port);
    for (;;) {
        int client = accept(server, NULL, NULL);
        if (client < 0) continue;
        serve(client, root);
        close(client);
    }
}
