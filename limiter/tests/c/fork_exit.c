/* Forks; the child exits 3; the parent reports and returns the child's status. */
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

int main(void)
{
    int status = 0;
    pid_t pid;
    fflush(stdout);
    pid = fork();
    if (pid < 0)
        return 100;
    if (pid == 0)
        _exit(3);
    if (waitpid(pid, &status, 0) != pid)
        return 101;
    printf("child exited %d\n", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 102;
}
