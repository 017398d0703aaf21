/* A compiled example: POST it to /api/v1/execute with "runtime": "c". */
#include <stdio.h>

int main(void) {
    char name[64];
    if (fgets(name, sizeof name, stdin) == NULL) return 1;
    printf("Hello, %s", name);
    return 0;
}
