/* The common case of the request grammar in C: whole multibulk commands written the
 * canonical way, and nothing else.
 *
 * Both engines' command readers (dbservice/engine/proxy/commands.py and
 * dbservice/engine/cluster/resp.py) ask this module first. It accepts a strict subset
 * of what valkey-server accepts and the pure-Python readers read the same way:
 *
 *   "*" <count> "\r\n", then <count> times "$" <length> "\r\n" <payload> "\r\n"
 *
 * where a count is 1 to max_count written without sign or leading zero, and a length is
 * 0 to max_length written likewise ("0", or digits not starting with "0"), all of it
 * already in the buffer. For anything else (an inline command, a sign, a leading zero,
 * a bad CR LF, a count of zero, a value over a limit, a command not all here) it
 * answers None and changes nothing: the caller's Python reader then reads the same
 * bytes and decides (valid, incomplete or refused). So this module never refuses and
 * never accepts anything the Python reader would not accept as the same command.
 *
 * Client bytes are hostile: every index is checked against the buffer's end before it
 * is read, numbers stop at 18 digits (no overflow of a 64-bit integer), and no object
 * is made before the whole command is known to be here and valid.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* Digits of a canonical non-negative number at buf[p:n], followed by "\r\n". On
 * success returns the position after the "\r\n" and stores the value; -1 when the line
 * is not canonical, over `max`, or not all here. */
static Py_ssize_t
read_number(const char *buf, Py_ssize_t p, Py_ssize_t n, long long max, long long *value)
{
    Py_ssize_t start = p;
    long long v = 0;
    while (p < n && buf[p] >= '0' && buf[p] <= '9') {
        if (p - start >= 18)
            return -1;
        v = v * 10 + (buf[p] - '0');
        p++;
    }
    if (p == start || (buf[start] == '0' && p - start > 1))
        return -1;
    if (v > max)
        return -1;
    if (n - p < 2 || buf[p] != '\r' || buf[p + 1] != '\n')
        return -1;
    *value = v;
    return p + 2;
}

/* Checks the command at buf[p:n]; returns where it ends, or -1 (see the top). Its
 * argument count goes to *count. */
static Py_ssize_t
measure(const char *buf, Py_ssize_t p, Py_ssize_t n, long long max_count,
        long long max_length, long long *count)
{
    long long argc, size, i;
    if (p >= n || buf[p] != '*')
        return -1;
    p = read_number(buf, p + 1, n, max_count, &argc);
    if (p < 0 || argc < 1)
        return -1;
    for (i = 0; i < argc; i++) {
        if (p >= n || buf[p] != '$')
            return -1;
        p = read_number(buf, p + 1, n, max_length, &size);
        if (p < 0)
            return -1;
        /* n - p >= 0 here, and size <= max_length < 2**62: no overflow */
        if ((long long)(n - p) < size + 2)
            return -1;
        p += (Py_ssize_t)size;
        if (buf[p] != '\r' || buf[p + 1] != '\n')
            return -1;
        p += 2;
    }
    *count = argc;
    return p;
}

/* The arguments of the command at buf[p:] that measure() found whole and valid. */
static PyObject *
arguments(const char *buf, Py_ssize_t p, long long argc)
{
    PyObject *args = PyList_New((Py_ssize_t)argc);
    long long i;
    if (args == NULL)
        return NULL;
    p += 1;
    while (buf[p] != '\r')
        p++;
    p += 2;
    for (i = 0; i < argc; i++) {
        Py_ssize_t size = 0;
        PyObject *arg;
        p += 1; /* '$' */
        while (buf[p] != '\r') {
            size = size * 10 + (buf[p] - '0');
            p++;
        }
        p += 2;
        arg = PyBytes_FromStringAndSize(buf + p, size);
        if (arg == NULL) {
            Py_DECREF(args);
            return NULL;
        }
        PyList_SET_ITEM(args, (Py_ssize_t)i, arg);
        p += size + 2;
    }
    return args;
}

static int
limits(PyObject *const *argv, Py_ssize_t at, long long *max_count, long long *max_length)
{
    *max_count = PyLong_AsLongLong(argv[at]);
    if (*max_count == -1 && PyErr_Occurred())
        return -1;
    *max_length = PyLong_AsLongLong(argv[at + 1]);
    if (*max_length == -1 && PyErr_Occurred())
        return -1;
    if (*max_count < 0 || *max_length < 0) {
        PyErr_SetString(PyExc_ValueError, "limits must not be negative");
        return -1;
    }
    /* Lengths past 2**62 cannot be in a buffer: keep size + 2 from overflowing. */
    if (*max_length > ((long long)1 << 62))
        *max_length = (long long)1 << 62;
    return 0;
}

static int
start_at(PyObject *arg, Py_ssize_t n, Py_ssize_t *p)
{
    *p = PyLong_AsSsize_t(arg);
    if (*p == -1 && PyErr_Occurred())
        return -1;
    if (*p < 0 || *p > n) {
        PyErr_SetString(PyExc_ValueError, "position outside the buffer");
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(command_doc,
"command(data, p, max_count, max_length, /)\n--\n\n"
"The whole, canonically written multibulk command at data[p:]: (arguments, where it\n"
"ends); None for anything else (the Python reader decides).");

/* The arguments every entry point takes: data (bytes) first, the start position at
 * argv[1], the two limits at argv[limits_at]; `name` and `wanted` for the errors. */
static int
begin(PyObject *const *argv, Py_ssize_t nargs, Py_ssize_t wanted, Py_ssize_t limits_at,
      const char *name, const char **buf, Py_ssize_t *n, Py_ssize_t *p,
      long long *max_count, long long *max_length)
{
    if (nargs != wanted) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments", name, wanted);
        return -1;
    }
    if (!PyBytes_Check(argv[0])) {
        PyErr_Format(PyExc_TypeError, "%s() needs bytes", name);
        return -1;
    }
    *buf = PyBytes_AS_STRING(argv[0]);
    *n = PyBytes_GET_SIZE(argv[0]);
    if (start_at(argv[1], *n, p) < 0 || limits(argv, limits_at, max_count, max_length) < 0)
        return -1;
    return 0;
}

static PyObject *
command(PyObject *module, PyObject *const *argv, Py_ssize_t nargs)
{
    const char *buf;
    Py_ssize_t n, p, end;
    long long max_count, max_length, argc = 0;
    PyObject *args;
    if (begin(argv, nargs, 4, 2, "command", &buf, &n, &p, &max_count, &max_length) < 0)
        return NULL;
    end = measure(buf, p, n, max_count, max_length, &argc);
    if (end < 0)
        Py_RETURN_NONE;
    args = arguments(buf, p, argc);
    if (args == NULL)
        return NULL;
    return Py_BuildValue("(Nn)", args, end);
}

PyDoc_STRVAR(commands_doc,
"commands(data, p, out, max_count, max_length, /)\n--\n\n"
"Append (arguments, the command's bytes) to the list out for each whole, canonically\n"
"written multibulk command from data[p:]; return where the first other thing starts\n"
"(len(data) when all of it was such commands).");

static PyObject *
commands(PyObject *module, PyObject *const *argv, Py_ssize_t nargs)
{
    const char *buf;
    Py_ssize_t n, p, end;
    long long max_count, max_length, argc = 0;
    PyObject *out;
    if (begin(argv, nargs, 5, 3, "commands", &buf, &n, &p, &max_count, &max_length) < 0)
        return NULL;
    out = argv[2];
    if (!PyList_Check(out)) {
        PyErr_SetString(PyExc_TypeError, "commands() needs a list to append to");
        return NULL;
    }
    while ((end = measure(buf, p, n, max_count, max_length, &argc)) >= 0) {
        PyObject *args, *raw, *item;
        int failed;
        args = arguments(buf, p, argc);
        if (args == NULL)
            return NULL;
        raw = PyBytes_FromStringAndSize(buf + p, end - p);
        if (raw == NULL) {
            Py_DECREF(args);
            return NULL;
        }
        item = PyTuple_Pack(2, args, raw);
        Py_DECREF(args);
        Py_DECREF(raw);
        if (item == NULL)
            return NULL;
        failed = PyList_Append(out, item);
        Py_DECREF(item);
        if (failed < 0)
            return NULL;
        p = end;
    }
    return PyLong_FromSsize_t(p);
}

static PyMethodDef methods[] = {
    {"command", (PyCFunction)(void (*)(void))command, METH_FASTCALL, command_doc},
    {"commands", (PyCFunction)(void (*)(void))commands, METH_FASTCALL, commands_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "_scan",
    "The common case of the request grammar in C (see dbservice/engine/proxy/framing.py).",
    0,
    methods,
};

PyMODINIT_FUNC
PyInit__scan(void)
{
    return PyModuleDef_Init(&module);
}
